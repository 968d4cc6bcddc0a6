"""Server-side limits and the parsing of request bodies.

Every value a request carries is checked here, with a message the page shows as is. Bodies are
JSON objects with known fields only: an unknown field (a ``path``, say) is refused, never ignored.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from typing import Any

from backward_lens import checks
from backward_lens.errors import InputError

SESSION_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
INTEGER_RE = re.compile(r"^\s*-?[0-9]{1,18}\s*$")
_JSON_TOKEN_RE = re.compile(r'\\.|["\[\]{}]', re.S)


@dataclass(frozen=True)
class Limits:
    """What one request may ask for (kept small: two CPU cores serve every user)."""

    max_prompt_chars: int = 500
    max_prompt_tokens: int = 64
    max_target_chars: int = 100
    max_top_k: int = 20
    max_neurons: int = 50
    min_eta: float = 0.0
    """Exclusive: eta must be larger (forward pass shift adds +eta x_n^T e_t)."""
    max_eta: float = 10.0
    max_extra_prompts: int = 8
    """Paraphrase prompts and neighbourhood prompts, each."""
    max_body_bytes: int = 64 * 1024
    max_json_depth: int = 8
    """Nesting of arrays and objects in a body (the deepest valid body has 2: ``{"a": []}``)."""
    max_sessions: int = 8

    def to_dict(self) -> dict[str, Any]:
        """The limits by name (sent to the page in ``/api/config``)."""
        return asdict(self)


def json_depth(text: str) -> int:
    """The deepest nesting of ``[``/``{`` in JSON text, outside strings (0 for a scalar).

    A linear scan with no recursion, so it is safe on any input (invalid JSON included).
    """
    depth = deepest = 0
    in_string = False
    for match in _JSON_TOKEN_RE.finditer(text):
        token = match.group()
        if token == '"':
            in_string = not in_string
        elif in_string or token[0] == "\\":
            continue
        elif token in "[{":
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth -= 1
    return deepest


def parse_json_body(raw: bytes, max_depth: int) -> Any:
    """Decode a request body: strict UTF-8, then JSON nested at most ``max_depth`` levels.

    An empty body decodes to ``None`` (which :class:`Body` refuses with its own message).

    Raises:
        InputError: the body is not UTF-8, not JSON, or nested too deeply (checked before
            parsing, so a deep body never reaches the recursive parser).
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError("the request body is not valid UTF-8 text") from None
    if not text.strip():
        return None
    if json_depth(text) > max_depth:
        raise InputError(
            f"the request body is nested more than {max_depth} levels deep; send a flat JSON object"
        )
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise InputError(f"the request body is not valid JSON ({exc})") from None


def _check_encodable(key: str, value: str) -> None:
    r"""Refuse strings that cannot be UTF-8 (lone surrogates from ``\\ud800`` escapes)."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError(f"{key} contains an invalid character (a lone surrogate)") from None


class Body:
    """A request's JSON object; each accessor checks one field with a message for the page.

    The checked values become a request model of ``backward_lens.schema`` (``ExplainRequest``,
    ``CellRequest``, ``EditRequest``), whose fields are the allowed names.

    Args:
        payload: the decoded body.
        allowed: the field names the request may carry.

    Raises:
        InputError: the body is not a JSON object, or it has a field not in ``allowed``.
    """

    def __init__(self, payload: Any, allowed: set[str]) -> None:
        """Check the body's type and field names."""
        if not isinstance(payload, dict):
            raise InputError("the request body must be a JSON object")
        unknown = sorted(set(payload) - allowed)
        if unknown:
            raise InputError(
                f"unknown field(s) {', '.join(map(repr, unknown))}; allowed: "
                f"{', '.join(sorted(allowed))}"
            )
        self.payload = payload

    def text(self, key: str, max_chars: int, default: str | None = None) -> str:
        """A required string of at most ``max_chars`` characters (``default`` if absent).

        Raises:
            InputError: missing, not a string, too long, or not encodable as UTF-8.
        """
        value = self.payload.get(key, default)
        if value is None:
            raise InputError(f"{key} is required")
        if not isinstance(value, str):
            raise InputError(f"{key} must be a string")
        if len(value) > max_chars:
            raise InputError(f"{key} is {len(value)} characters long; the limit is {max_chars}")
        _check_encodable(key, value)
        return value

    def integer(self, key: str, lo: int, hi: int, default: int | None = None) -> int:
        """An integer in ``[lo, hi]`` (a string of digits is read as one; not a bool).

        Raises:
            InputError: missing without a default, not an integer, or out of range.
        """
        value = self.payload.get(key, default)
        if isinstance(value, str) and INTEGER_RE.match(value):
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise InputError(f"{key} must be an integer from {lo} to {hi} (got {value!r})")
        return value

    def number(self, key: str, lo: float, hi: float, default: float | None = None) -> float:
        """A float in (lo, hi]: the lower bound is exclusive.

        Raises:
            InputError: missing without a default, not a finite number, or out of range.
        """
        value = self.payload.get(key, default)
        try:  # the same check as the CLI and the editors (backward_lens.checks)
            return checks.number(key, value, lo=lo, hi=hi)
        except InputError:
            raise InputError(
                f"{key} must be a number above {lo} and at most {hi} (got {value!r})"
            ) from None

    def flag(self, key: str, default: bool = False) -> bool:
        """A JSON ``true`` or ``false`` (``default`` if absent).

        Raises:
            InputError: any other value.
        """
        value = self.payload.get(key, default)
        if not isinstance(value, bool):
            raise InputError(f"{key} must be true or false")
        return value

    def choice(self, key: str, options: list[str], default: str | None = None) -> str:
        """One of ``options``.

        Raises:
            InputError: any other value.
        """
        value = self.payload.get(key, default)
        if value not in options:
            raise InputError(f"{key} must be one of {', '.join(options)} (got {value!r})")
        return str(value)

    def texts(self, key: str, max_items: int, max_chars: int) -> list[str]:
        """A list of strings (blank ones dropped); a single string is split into lines.

        Raises:
            InputError: not strings, more than ``max_items``, or one over ``max_chars``.
        """
        value = self.payload.get(key, [])
        if isinstance(value, str):
            value = value.splitlines()
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise InputError(f"{key} must be a list of strings")
        items = [v.strip() for v in value if v.strip()]
        if len(items) > max_items:
            raise InputError(f"{key}: {len(items)} prompts given; the limit is {max_items}")
        for v in items:
            if len(v) > max_chars:
                raise InputError(
                    f"{key}: a prompt is {len(v)} characters; the limit is {max_chars}"
                )
            _check_encodable(key, v)
        return items

    def session(self) -> str:
        """The session id: 1 to 64 letters, digits, ``-`` or ``_`` (default ``"default"``).

        Raises:
            InputError: any other value.
        """
        value = self.payload.get("session", "default")
        if not isinstance(value, str) or not SESSION_RE.match(value):
            raise InputError("session must be 1 to 64 letters, digits, '-' or '_'")
        return value
