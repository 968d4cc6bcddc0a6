"""The viewer's request logic, independent of HTTP: explain, cell details, edit, status.

Each method takes a decoded JSON body and returns a JSON-ready dict, or raises
:class:`~backward_lens.errors.BackwardLensError` with a message for the page (HTTP 400). Every
use of a model happens inside that model's lock (:class:`~backward_lens.web.pool.ModelSlot`).
The last capture of each browser session is kept (a small LRU), so switching the lens, the top-k
or clicking cells re-reads it without a new backward pass.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from backward_lens.batching import model_inputs, pad_batch, pad_id
from backward_lens.capture import Capture, capture_requests, frozen_for_capture
from backward_lens.editing import RewriteRequest, get_editor
from backward_lens.editing.defaults import editor_defaults
from backward_lens.errors import InputError
from backward_lens.explain import explain_capture
from backward_lens.models import LensModel
from backward_lens.tokens import EncodedRequest, encode_request, encode_text
from backward_lens.web.cells import cell_details
from backward_lens.web.pool import ModelPool
from backward_lens.web.validation import Body, Limits

EXAMPLE = {"prompt": "The Eiffel Tower is located in the city of", "target": " Rome"}

EditorFactory = Callable[[int, float], Any]


def shift_editor(layer: int, eta: float) -> Any:
    """Forward pass shift at one layer (``backward_lens.editing``'s ``shift`` method)."""
    return get_editor("shift", layer=layer, eta=eta)


@dataclass
class SessionState:
    model: str
    prompt: str
    target: str
    capture: Capture


class Sessions:
    """The last capture of each session id, least recently used evicted first."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: OrderedDict[str, SessionState] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> SessionState | None:
        with self._lock:
            state = self._items.get(key)
            if state is not None:
                self._items.move_to_end(key)
            return state

    def put(self, key: str, state: SessionState) -> None:
        with self._lock:
            self._items[key] = state
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)


@contextmanager
def guarded(model: nn.Module, names: list[str]) -> Iterator[None]:
    """Check on exit that the named parameters are bit-identical to their values on entry.

    A safety net around an edit: if they differ (a failed revert), restore them and fail loudly.
    """
    params = dict(model.named_parameters())
    saved = {k: params[k].detach().clone() for k in names if k in params}
    try:
        yield
    finally:
        changed = [k for k, v in saved.items() if not torch.equal(params[k].detach(), v)]
        if changed:
            with torch.no_grad():
                for k in changed:
                    params[k].copy_(saved[k])
            raise RuntimeError(f"parameters {changed} were left edited; restored from a copy")


class ViewerApp:
    """The viewer's API. ``pool`` lists the usable models; nothing else can be loaded."""

    def __init__(
        self,
        pool: ModelPool,
        limits: Limits | None = None,
        editor_factory: EditorFactory = shift_editor,
        runs: Any = None,
    ) -> None:
        self.pool = pool
        self.limits = limits or Limits()
        self.editor_factory = editor_factory
        self.runs = runs
        """Training-lens run folders shown under /training (a ``training.viewer.RunLibrary``)."""
        self.sessions = Sessions(self.limits.max_sessions)

    # -- configuration and status ---------------------------------------------------------------

    def config(self) -> dict[str, Any]:
        return {
            "models": self.pool.names,
            "default_model": self.pool.default,
            "limits": self.limits.to_dict(),
            "example": EXAMPLE,
            "models_status": self.pool.status(),
        }

    def status(self, payload: Any = None) -> dict[str, Any]:
        return {"models": self.pool.status()}

    # -- helpers --------------------------------------------------------------------------------

    def _encode(self, lm: LensModel, prompt: str, target: str) -> EncodedRequest:
        request = encode_request(
            lm.tokenizer, prompt, target, multi_token="first", max_length=lm.context_length
        )
        self._check_tokens(len(request.prompt_ids), "the prompt")
        return request

    def _check_tokens(self, n: int, what: str) -> None:
        if n > self.limits.max_prompt_tokens:
            raise InputError(
                f"{what} is {n} tokens; the viewer accepts at most {self.limits.max_prompt_tokens}"
            )

    # -- explain --------------------------------------------------------------------------------

    def explain(self, payload: Any) -> dict[str, Any]:
        """Body: prompt, target, model, top_k, normalized, session, fresh.

        The session's last capture is reused when model, prompt and target are unchanged (a lens
        or top-k switch), unless ``fresh`` asks for a new forward and backward pass.
        """
        lim = self.limits
        body = Body(
            payload, {"prompt", "target", "model", "top_k", "normalized", "session", "fresh"}
        )
        prompt = body.text("prompt", lim.max_prompt_chars)
        target = body.text("target", lim.max_target_chars)
        top_k = body.integer("top_k", 1, lim.max_top_k, default=3)
        normalized = body.flag("normalized")
        fresh = body.flag("fresh")
        session = body.session()
        slot = self.pool.get(body.payload.get("model"))
        start = time.perf_counter()
        with slot.use() as lm:
            request = self._encode(lm, prompt, target)
            state = self.sessions.get(session)
            key = (slot.name, prompt, target)
            reused = (
                not fresh and state is not None and (state.model, state.prompt, state.target) == key
            )
            if state is not None and reused:
                cap = state.capture
            else:
                cap = capture_requests(lm, [request])[0]
                state = SessionState(slot.name, prompt, target, cap)
            expl = explain_capture(lm, cap, top_k=top_k, normalized=normalized)
        self.sessions.put(session, state)
        notes = []
        if len(request.all_target_ids) > 1:
            notes.append(
                f"the target is {len(request.all_target_ids)} tokens; the loss and the ranks use "
                f"its first token {expl.target['token']!r}"
            )
        return {
            "explanation": expl.to_dict(),
            "model": slot.name,
            "n_layers": lm.n_layers,
            "reused_capture": reused,
            "seconds": round(time.perf_counter() - start, 3),
            "notes": notes,
        }

    # -- cell details ---------------------------------------------------------------------------

    def cell(self, payload: Any) -> dict[str, Any]:
        """Body: session, matrix, layer, position, top_k, neurons, normalized."""
        lim = self.limits
        body = Body(
            payload, {"session", "matrix", "layer", "position", "top_k", "neurons", "normalized"}
        )
        session = body.session()
        matrix = body.choice("matrix", ["ff1", "ff2"])
        top_k = body.integer("top_k", 1, lim.max_top_k, default=5)
        n_neurons = body.integer("neurons", 1, lim.max_neurons, default=10)
        normalized = body.flag("normalized")
        state = self.sessions.get(session)
        if state is None:
            raise InputError("nothing to show yet: submit a prompt first (or the session expired)")
        cap = state.capture
        layer = body.integer("layer", min(cap.layers), max(cap.layers))
        position = body.integer("position", 0, cap.n - 1)
        with self.pool.get(state.model).use() as lm:
            return cell_details(
                lm,
                cap,
                matrix,
                layer,
                position,
                k=top_k,
                n_neurons=n_neurons,
                normalized=normalized,
            )

    # -- edit -----------------------------------------------------------------------------------

    @torch.no_grad()
    def predict(self, lm: LensModel, prompts: list[str], target_id: int) -> list[dict[str, Any]]:
        """Top-1 next token of each prompt, and the target's probability and rank.

        One left-padded batch (``batching.pad_batch``, as in ``capture``), so the edit panel
        costs two forward passes (before and after) whatever the number of prompts. Each prompt
        is encoded as a target would follow it (``tokens``: white space at its end is dropped).
        """
        encoded = [encode_text(lm.tokenizer, p.rstrip()) for p in prompts]
        batch = pad_batch(encoded, pad_id(lm.tokenizer), device=lm.device)
        with frozen_for_capture(lm.model):
            out = lm.model(**model_inputs(lm.model, batch, logits_to_keep=1))
        logits = out.logits[:, -1].float()  # [B, V]: left padding puts every prompt's end here
        probs = logits.softmax(-1)
        top = logits.argmax(-1).tolist()
        ranks = (logits > logits[:, target_id : target_id + 1]).sum(-1).tolist()
        words = lm.decode(top)
        return [
            {
                "token": words[b],
                "token_id": top[b],
                "prob": float(probs[b, top[b]]),
                "target_prob": float(probs[b, target_id]),
                "target_rank": int(ranks[b]),
            }
            for b in range(len(encoded))
        ]

    def edit(self, payload: Any) -> dict[str, Any]:
        """Body: prompt, target, model, layer, eta, paraphrases, neighborhood, subject, session.

        ``layer`` and ``eta`` default to the model's defaults (``editing/defaults.py``).
        Applies forward pass shift, reads the predictions, and reverts, all inside the model's
        lock; the model is restored even if anything fails in between.
        """
        lim = self.limits
        body = Body(
            payload,
            {
                "prompt",
                "target",
                "model",
                "layer",
                "eta",
                "paraphrases",
                "neighborhood",
                "subject",
                "session",
            },
        )
        prompt = body.text("prompt", lim.max_prompt_chars)
        target = body.text("target", lim.max_target_chars)
        subject = body.text("subject", lim.max_prompt_chars, default="")
        eta_given = body.payload.get("eta") not in (None, "")
        eta = body.number("eta", lim.min_eta, lim.max_eta) if eta_given else None
        paraphrases = body.texts("paraphrases", lim.max_extra_prompts, lim.max_prompt_chars)
        neighborhood = body.texts("neighborhood", lim.max_extra_prompts, lim.max_prompt_chars)
        body.session()
        slot = self.pool.get(body.payload.get("model"))
        request = RewriteRequest(prompt.rstrip(), subject, target)
        start = time.perf_counter()
        with slot.use() as lm:
            defaults = editor_defaults(lm, "shift")
            layer = body.integer("layer", 0, lm.n_layers - 1, default=defaults["layer"])
            eta = float(defaults["eta"]) if eta is None else eta
            encoded = self._encode(lm, prompt, target)
            target_id = encoded.target_ids[0]
            prompts = [("prompt", prompt)]
            prompts += [("paraphrase", p) for p in paraphrases]
            prompts += [("neighborhood", p) for p in neighborhood]
            for kind, text in prompts[1:]:
                self._check_tokens(len(encode_text(lm.tokenizer, text)), f"a {kind} prompt")
            texts = [p for _, p in prompts]
            ff2 = lm.arch.resolve(layer, "ff2").module
            ff2_names = [n for n, p in lm.model.named_parameters() if p is ff2.weight]
            with guarded(lm.model, ff2_names):
                before = self.predict(lm, texts, target_id)
                edit = self.editor_factory(layer, eta)(lm, [request])
                with guarded(lm.model, list(edit.deltas)):
                    if edit.deltas:
                        with edit.applied(lm.model):
                            after = self.predict(lm, texts, target_id)
                    else:
                        after = before
        return {
            "model": slot.name,
            "method": edit.method,
            "layer": layer,
            "eta": eta,
            "target": {"text": encoded.target_text, "token": lm.decode([target_id])[0]},
            "skipped": not edit.deltas,
            "info": _jsonable(edit.info),
            "delta_norm": float(sum(float(d.float().norm() ** 2) for d in edit.deltas.values()))
            ** 0.5,
            "parameters": sorted(edit.deltas),
            "rows": [
                {"kind": kind, "prompt": text, "before": b, "after": a}
                for (kind, text), b, a in zip(prompts, before, after, strict=True)
            ],
            "reverted": True,
            "seconds": round(time.perf_counter() - start, 3),
        }


def _jsonable(value: Any) -> Any:
    """Edit info as JSON (tensors to lists, unknown objects to strings)."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Tensor):
        return value.tolist() if value.numel() <= 16 else f"tensor{tuple(value.shape)}"
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)
