"""Server-side limits and the parsing of request bodies.

Every value a request carries is checked here, with a message the page shows as is. Bodies are
JSON objects with known fields only: an unknown field (a ``path``, say) is refused, never ignored.
"""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import asdict, dataclass
from typing import Any

from backward_lens.errors import InputError

SESSION_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


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
    max_sessions: int = 8

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Body:
    """A request's JSON object; each accessor validates one field and records it as known."""

    def __init__(self, payload: Any, allowed: set[str]) -> None:
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
        value = self.payload.get(key, default)
        if value is None:
            raise InputError(f"{key} is required")
        if not isinstance(value, str):
            raise InputError(f"{key} must be a string")
        if len(value) > max_chars:
            raise InputError(f"{key} is {len(value)} characters long; the limit is {max_chars}")
        return value

    def integer(self, key: str, lo: int, hi: int, default: int | None = None) -> int:
        value = self.payload.get(key, default)
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise InputError(f"{key} must be an integer from {lo} to {hi} (got {value!r})")
        return value

    def number(self, key: str, lo: float, hi: float, default: float | None = None) -> float:
        """A float in (lo, hi]: the lower bound is exclusive."""
        value = self.payload.get(key, default)
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                value = float(value)
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or not math.isfinite(value)
            or not lo < value <= hi
        ):
            raise InputError(f"{key} must be a number above {lo} and at most {hi} (got {value!r})")
        return float(value)

    def flag(self, key: str, default: bool = False) -> bool:
        value = self.payload.get(key, default)
        if not isinstance(value, bool):
            raise InputError(f"{key} must be true or false")
        return value

    def choice(self, key: str, options: list[str], default: str | None = None) -> str:
        value = self.payload.get(key, default)
        if value not in options:
            raise InputError(f"{key} must be one of {', '.join(options)} (got {value!r})")
        return str(value)

    def texts(self, key: str, max_items: int, max_chars: int) -> list[str]:
        """A list of strings (blank ones dropped); a single string is split into lines."""
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
        return items

    def session(self) -> str:
        value = self.payload.get("session", "default")
        if not isinstance(value, str) or not SESSION_RE.match(value):
            raise InputError("session must be 1 to 64 letters, digits, '-' or '_'")
        return value
