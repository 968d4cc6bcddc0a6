"""The viewer's request logic, independent of HTTP: explain, cell details, edit, status.

Each method takes a decoded JSON body, checks it field by field (``web.validation.Body``) into
its request model, and returns its reply model (``backward_lens.schema``: :class:`ExplainReply`,
:class:`EditReply`; cell details, configuration and status are plain dicts), or raises
:class:`~backward_lens.errors.BackwardLensError` with a message for the page (HTTP 400). The
server writes every reply with the one serialiser, ``backward_lens.io.dumps``. Every
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
from torch import nn

from backward_lens.batching import model_inputs, pad_batch, pad_id
from backward_lens.capture import Capture, capture_requests, frozen_for_capture
from backward_lens.editing import RewriteRequest, get_editor
from backward_lens.editing.defaults import editor_defaults
from backward_lens.errors import InputError
from backward_lens.explain import explain_capture
from backward_lens.io import to_jsonable
from backward_lens.models import LensModel
from backward_lens.schema import (
    CellReply,
    CellRequest,
    EditedPrompt,
    EditReply,
    EditRequest,
    EditTarget,
    ExplainReply,
    ExplainRequest,
    PromptKind,
    PromptPrediction,
)
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
    """What a browser session last explained: the model, the pair, and its capture (reused)."""

    model: str
    prompt: str
    target: str
    capture: Capture


class Sessions:
    """The last capture of each session id, least recently used evicted first.

    Args:
        size: sessions kept (``Limits.max_sessions``).
    """

    def __init__(self, size: int) -> None:
        """Start with no sessions."""
        self.size = size
        self._items: OrderedDict[str, SessionState] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> SessionState | None:
        """The session's state (now the most recently used), or None."""
        with self._lock:
            state = self._items.get(key)
            if state is not None:
                self._items.move_to_end(key)
            return state

    def put(self, key: str, state: SessionState) -> None:
        """Keep ``state`` for ``key``, evicting the least recently used beyond ``size``."""
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
    """The viewer's API. ``pool`` lists the usable models; nothing else can be loaded.

    Args:
        pool: the configured models (loaded on first use).
        limits: what one request may ask for (default :class:`Limits`).
        editor_factory: ``(layer, eta) -> editor`` of the edit panel (forward pass shift).
        runs: training-lens run folders shown under ``/training`` (``serve --runs``), or None.
    """

    def __init__(
        self,
        pool: ModelPool,
        limits: Limits | None = None,
        editor_factory: EditorFactory = shift_editor,
        runs: Any = None,
    ) -> None:
        """Keep the pool and limits; no session yet."""
        self.pool = pool
        self.limits = limits or Limits()
        self.editor_factory = editor_factory
        self.runs = runs
        """Training-lens run folders shown under /training (a ``training.viewer.RunLibrary``)."""
        self.sessions = Sessions(self.limits.max_sessions)

    # -- configuration and status ---------------------------------------------------------------

    def config(self) -> dict[str, Any]:
        """``GET /api/config``: the models, the default, the limits, an example and the status."""
        return {
            "models": self.pool.names,
            "default_model": self.pool.default,
            "limits": self.limits.to_dict(),
            "example": EXAMPLE,
            "models_status": self.pool.status(),
        }

    def status(self, payload: Any = None) -> dict[str, Any]:
        """``GET /api/status``: each model's status (loaded, loading, failed...)."""
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

    def explain_request(self, payload: Any) -> ExplainRequest:
        """Check an explain body field by field (one message per mistake, for the page).

        Raises:
            InputError: an unknown field, a value of the wrong type or out of range, or a model
                that is not configured.
        """
        lim = self.limits
        body = Body(payload, set(ExplainRequest.model_fields))
        return ExplainRequest(
            prompt=body.text("prompt", lim.max_prompt_chars),
            target=body.text("target", lim.max_target_chars),
            top_k=body.integer("top_k", 1, lim.max_top_k, default=3),
            normalized=body.flag("normalized"),
            fresh=body.flag("fresh"),
            session=body.session(),
            model=self.pool.get(body.payload.get("model")).name,  # a configured model only
        )

    def explain(self, payload: Any) -> ExplainReply:
        """Body: prompt, target, model, top_k, normalized, session, fresh (``ExplainRequest``).

        The session's last capture is reused when model, prompt and target are unchanged (a lens
        or top-k switch), unless ``fresh`` asks for a new forward and backward pass.

        Raises:
            InputError: a bad body, an unknown model, or a prompt over the token limit.
        """
        req = self.explain_request(payload)
        slot = self.pool.get(req.model)
        start = time.perf_counter()
        with slot.use() as lm:
            request = self._encode(lm, req.prompt, req.target)
            state = self.sessions.get(req.session)
            key = (slot.name, req.prompt, req.target)
            reused = (
                not req.fresh
                and state is not None
                and (state.model, state.prompt, state.target) == key
            )
            if state is not None and reused:
                cap = state.capture
            else:
                cap = capture_requests(lm, [request])[0]
                state = SessionState(slot.name, req.prompt, req.target, cap)
            expl = explain_capture(lm, cap, top_k=req.top_k, normalized=req.normalized)
        self.sessions.put(req.session, state)
        notes = []
        if len(request.all_target_ids) > 1:
            notes.append(
                f"the target is {len(request.all_target_ids)} tokens; the loss and the ranks use "
                f"its first token {expl.target.token!r}"
            )
        return ExplainReply.model_validate(
            {
                "explanation": expl.to_dict(),
                "model": slot.name,
                "n_layers": lm.n_layers,
                "reused_capture": reused,
                "seconds": round(time.perf_counter() - start, 3),
                "notes": notes,
            }
        )

    # -- cell details ---------------------------------------------------------------------------

    def cell(self, payload: Any) -> CellReply:
        """Body: session, matrix, layer, position, top_k, neurons, normalized (``CellRequest``).

        Raises:
            InputError: a bad body, no capture for the session yet, or a layer or position that
                the session's capture does not have.
        """
        lim = self.limits
        body = Body(payload, set(CellRequest.model_fields))
        session = body.session()
        matrix = body.choice("matrix", ["ff1", "ff2"])
        top_k = body.integer("top_k", 1, lim.max_top_k, default=5)
        n_neurons = body.integer("neurons", 1, lim.max_neurons, default=10)
        normalized = body.flag("normalized")
        state = self.sessions.get(session)
        if state is None:
            raise InputError("nothing to show yet: submit a prompt first (or the session expired)")
        cap = state.capture
        req = CellRequest(
            session=session,
            matrix="ff1" if matrix == "ff1" else "ff2",
            layer=body.integer("layer", min(cap.layers), max(cap.layers)),
            position=body.integer("position", 0, cap.n - 1),
            top_k=top_k,
            neurons=n_neurons,
            normalized=normalized,
        )
        with self.pool.get(state.model).use() as lm:
            return cell_details(
                lm,
                cap,
                req.matrix,
                req.layer,
                req.position,
                k=req.top_k,
                n_neurons=req.neurons,
                normalized=req.normalized,
            )

    # -- edit -----------------------------------------------------------------------------------

    @torch.no_grad()
    def predict(self, lm: LensModel, prompts: list[str], target_id: int) -> list[PromptPrediction]:
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
            PromptPrediction(
                token=words[b],
                token_id=top[b],
                prob=float(probs[b, top[b]]),
                target_prob=float(probs[b, target_id]),
                target_rank=int(ranks[b]),
            )
            for b in range(len(encoded))
        ]

    def edit_request(self, payload: Any) -> tuple[EditRequest, Body]:
        """Check an edit body field by field, all but ``layer`` (its range needs the model).

        Returns:
            The request (``layer`` None, ``eta`` None when not given) and the body, whose
            ``layer`` :meth:`edit` checks against the model.

        Raises:
            InputError: an unknown field, a value of the wrong type or out of range, or a model
                that is not configured.
        """
        lim = self.limits
        body = Body(payload, set(EditRequest.model_fields))
        prompt = body.text("prompt", lim.max_prompt_chars)
        target = body.text("target", lim.max_target_chars)
        subject = body.text("subject", lim.max_prompt_chars, default="")
        eta_given = body.payload.get("eta") not in (None, "")
        eta = body.number("eta", lim.min_eta, lim.max_eta) if eta_given else None
        paraphrases = body.texts("paraphrases", lim.max_extra_prompts, lim.max_prompt_chars)
        neighborhood = body.texts("neighborhood", lim.max_extra_prompts, lim.max_prompt_chars)
        session = body.session()
        model = self.pool.get(body.payload.get("model")).name
        request = EditRequest(
            prompt=prompt,
            target=target,
            subject=subject,
            eta=eta,
            paraphrases=paraphrases,
            neighborhood=neighborhood,
            session=session,
            model=model,
        )
        return request, body

    def edit(self, payload: Any) -> EditReply:
        """Body: prompt, target, model, layer, eta, paraphrases, neighborhood, subject, session.

        ``layer`` and ``eta`` default to the model's defaults (``editing/defaults.py``).
        Applies forward pass shift, reads the predictions, and reverts, all inside the model's
        lock; the model is restored even if anything fails in between.

        Raises:
            InputError: a bad body (:meth:`edit_request`), a layer out of range, or a prompt
                over the token limit.
        """
        req, body = self.edit_request(payload)
        slot = self.pool.get(req.model)
        request = RewriteRequest(req.prompt.rstrip(), req.subject, req.target)
        start = time.perf_counter()
        with slot.use() as lm:
            defaults = editor_defaults(lm, "shift")
            layer = body.integer("layer", 0, lm.n_layers - 1, default=defaults["layer"])
            eta = float(defaults["eta"]) if req.eta is None else req.eta
            req = req.model_copy(update={"layer": layer, "eta": eta})  # as run
            encoded = self._encode(lm, req.prompt, req.target)
            target_id = encoded.target_ids[0]
            prompts: list[tuple[PromptKind, str]] = [("prompt", req.prompt)]
            prompts += [("paraphrase", p) for p in req.paraphrases]
            prompts += [("neighborhood", p) for p in req.neighborhood]
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
        return EditReply(
            model=slot.name,
            method=edit.method,
            layer=layer,
            eta=eta,
            target=EditTarget(text=encoded.target_text, token=lm.decode([target_id])[0]),
            skipped=not edit.deltas,
            info=to_jsonable(edit.info),
            delta_norm=float(sum(float(d.float().norm() ** 2) for d in edit.deltas.values()))
            ** 0.5,
            parameters=sorted(edit.deltas),
            rows=[
                EditedPrompt(kind=kind, prompt=text, before=b, after=a)
                for (kind, text), b, a in zip(prompts, before, after, strict=True)
            ],
            reverted=True,
            seconds=round(time.perf_counter() - start, 3),
        )
