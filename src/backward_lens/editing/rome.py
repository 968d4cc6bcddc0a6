"""ROME (Meng et al. 2022): a rank-one update of FF2 at the subject's last token.

1. Key k*: FF2's input at the subject's last token, averaged over the edit prompt preceded by a
   few short texts sampled from the model ("context templates").
2. Value v*: FF2's output there plus a vector delta optimised (Adam) so that the model predicts
   the new target after every templated prompt (teacher-forced NLL), with a KL term keeping
   "{subject} is a" unchanged, a weight decay and a norm clamp.
3. Update: W <- W + u (v* - W k*)^T / (u . k*), u = C^-1 k* / |C^-1 k*|, with C the key second
   moment (``stats.py``). As in r-ROME, the same averaged k* is used in both places, so after the
   edit FF2 maps k* exactly to v*.

The pieces (templates, subject positions, keys, value optimisation) are reused by MEMIT.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from backward_lens.batching import Hooks, by_position, eval_mode, pad_batch, pad_id
from backward_lens.capture import frozen_for_capture
from backward_lens.editing.base import Edit, RewriteRequest, hparams_of, model_fingerprint
from backward_lens.editing.defaults import editor_defaults
from backward_lens.editing.matrix import EditedMatrix, ff2
from backward_lens.editing.request_tokens import edit_tokens, require_subjects
from backward_lens.editing.stats import SampleConfig, StopForward, second_moments
from backward_lens.editing.upper_layers import UpperBlocks
from backward_lens.models import LensModel
from backward_lens.tokens import encode_text, locate_subject

LEAN = True
"""Skip the work an edit does not need (measured in ``benchmarks/bench_rome.py``): the key pass
stops at the edited module instead of running the whole model, and the unedited value is read in
the pass that records the upper blocks instead of one more pass. Results are unchanged; False
restores the earlier passes, for the benchmark's before/after."""

_TEMPLATE_CACHE: dict[tuple[str, str, tuple[tuple[int, int], ...], int], list[str]] = {}
_TEMPLATE_OPENINGS = ("The", "Therefore", "Because", "I", "You")


# --------------------------------------------------------------------------- context templates


@torch.no_grad()
def context_prefixes(
    lm: LensModel, spec: Sequence[Sequence[int]] = ((5, 10), (10, 10)), seed: int = 0
) -> list[str]:
    """Prefixes put before the edit prompt: ``""`` plus short sampled texts ending in ". ".

    ``spec`` lists (length in tokens, count) pairs, as ROME's ``context_template_length_params``;
    the texts are top-k (5) samples from the model after MEMIT's openings, with a fixed seed.
    """
    key = (lm.name, model_fingerprint(lm.model), tuple((int(a), int(b)) for a, b in spec), seed)
    if key in _TEMPLATE_CACHE:
        return list(_TEMPLATE_CACHE[key])
    out = [""]
    tok = lm.tokenizer
    with eval_mode(lm.model), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for length, count in spec:
            prompts = [_TEMPLATE_OPENINGS[i % len(_TEMPLATE_OPENINGS)] for i in range(count)]
            batch = pad_batch([encode_text(tok, p) for p in prompts], pad_id(tok), device=lm.device)
            width = batch.shape[1]
            gen = lm.model.generate(  # type: ignore[operator]
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                do_sample=True,
                top_k=5,
                max_new_tokens=length,
                pad_token_id=pad_id(tok),
            )
            for b, p in enumerate(prompts):
                text = p + tok.decode(gen[b, width:], skip_special_tokens=True)
                text = text.replace("{", " ").replace("}", " ").replace("\n", " ").strip()
                out.append(text + ". ")
    _TEMPLATE_CACHE[key] = out
    return list(out)


# --------------------------------------------------------------------------- subject positions


@dataclass(frozen=True)
class SubjectPrompt:
    """A token sequence and the position of the subject's last token in it."""

    ids: list[int]
    index: int


def prompts_at_subject(
    lm: LensModel, request: RewriteRequest, prefixes: Sequence[str]
) -> list[SubjectPrompt]:
    """The edit prompt after each prefix, with the subject's last token located.

    Located by character offsets after the prefix, white space around the subject ignored
    (``tokens.locate_subject``).
    """
    out = []
    for prefix in prefixes:
        ids, (_, end) = locate_subject(
            lm.tokenizer, prefix + request.prompt, request.subject, search_from=len(prefix)
        )
        out.append(SubjectPrompt(ids, end - 1))
    return out


# --------------------------------------------------------------------------- keys


@torch.no_grad()
def module_io_at(
    lm: LensModel, module: nn.Module, prompts: Sequence[SubjectPrompt]
) -> tuple[Tensor, Tensor]:
    """Input and output of ``module`` at each prompt's subject position: [N, d_in], [N, d_out]."""
    batch = pad_batch(
        [p.ids for p in prompts], pad_id(lm.tokenizer), side="right", device=lm.device
    )
    ids, mask = batch.input_ids, batch.attention_mask
    got: dict[str, Tensor] = {}

    def hook(mod: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        out = output[0] if isinstance(output, tuple) else output
        got["out"] = by_position(out, batch.shape).detach()
        got["in"] = by_position(args[0], batch.shape).detach() if args else got["out"]
        if LEAN:
            raise StopForward  # nothing above `module` is read: the blocks above never run

    with Hooks() as hooks, eval_mode(lm.model), contextlib.suppress(StopForward):
        hooks.forward(module, hook)
        lm.model(input_ids=ids, attention_mask=mask, use_cache=False)
    rows = torch.arange(len(prompts), device=ids.device)
    index = torch.tensor([p.index for p in prompts], device=ids.device)
    return got["in"][rows, index], got["out"][rows, index]


def average_key(
    lm: LensModel, matrix: EditedMatrix, request: RewriteRequest, prefixes: Sequence[str]
) -> Tensor:
    """k*: FF2's input at the subject's last token, averaged over the prefixes, [d_ff]."""
    keys, _ = module_io_at(lm, matrix.module, prompts_at_subject(lm, request, prefixes))
    return keys.mean(0)


# --------------------------------------------------------------------------- value optimisation


@dataclass(frozen=True)
class ValueConfig:
    """Hyper-parameters of the value optimisation (ROME's ``v_*`` settings)."""

    steps: int = 20
    lr: float = 0.5
    weight_decay: float = 0.5
    clamp_norm_factor: float = 4.0
    kl_factor: float = 0.0625
    stop_loss: float = 5e-2


@dataclass
class ValueResult:
    """v* = init + delta at the subject's last token of the unprefixed prompt."""

    init: Tensor
    delta: Tensor
    losses: list[float] = field(default_factory=list)

    @property
    def target(self) -> Tensor:
        """The optimised output: the unedited one plus the delta, [d_out]."""
        return self.init + self.delta


def optimize_value(
    lm: LensModel,
    module: nn.Module,
    layer: int,
    request: RewriteRequest,
    prefixes: Sequence[str],
    config: ValueConfig,
) -> ValueResult:
    """Find the vector whose addition to ``module``'s output makes the model predict the target.

    Added at the subject's last token in every templated prompt, it should make the model
    predict ``request.target_new`` (ROME's compute_v / MEMIT's compute_z; ``module`` is block
    ``layer``'s FF2 for ROME, the block for MEMIT).

    The blocks below ``layer`` run once (:class:`UpperBlocks`); each Adam step runs the blocks
    from ``layer`` up and applies the LM head only where the loss reads it (the target tokens
    and the KL position), which gives the same loss and gradient as full forward passes.
    """
    target_ids = edit_tokens(lm, request.prompt, request.target_new).target_ids
    rewrites = prompts_at_subject(lm, request, prefixes)
    kl_ids, (_, kl_end) = locate_subject(
        lm.tokenizer, f"{request.subject.strip()} is a", request.subject
    )
    kl_index = kl_end - 1
    seqs = [p.ids + target_ids[:-1] for p in rewrites] + [kl_ids]
    batch = pad_batch(seqs, pad_id(lm.tokenizer), side="right", device=lm.device)
    ids, mask = batch.input_ids, batch.attention_mask
    b, t = ids.shape
    # Positions whose next-token logits score the target: row i, columns len(ids_i)-1+j.
    n_target = len(target_ids)
    rows = torch.tensor([i for i in range(len(rewrites)) for _ in range(n_target)])
    cols = torch.tensor([len(p.ids) - 1 + j for p in rewrites for j in range(n_target)])
    labels = torch.tensor(target_ids * len(rewrites), device=lm.device)
    where = torch.zeros(b, t, 1, device=lm.device)
    for i, p in enumerate(rewrites):
        where[i, p.index] = 1.0
    where[-1, kl_index] = 1.0

    with eval_mode(lm.model):
        state: dict[str, Tensor] = {}

        def hook(mod: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
            out = output[0] if isinstance(output, tuple) else output
            view = by_position(out, (b, t))
            if "init" not in state:
                state["init"] = view[0, rewrites[0].index].detach().clone()
            if "delta" not in state:
                return None
            new = (view + where.to(view.dtype) * state["delta"].to(view.dtype)).reshape(out.shape)
            return (new, *output[1:]) if isinstance(output, tuple) else new

        if LEAN:  # the unedited output at the subject, read in the pass that records the blocks
            with Hooks() as hooks:
                hooks.forward(module, hook)
                upper = UpperBlocks(lm, layer, ids, mask)
        else:  # (the earlier way: one more pass of the upper blocks, for benchmarks)
            upper = UpperBlocks(lm, layer, ids, mask)
            with torch.no_grad():
                upper.final_hidden(module, hook)
        delta = torch.zeros_like(state["init"], dtype=torch.float32, requires_grad=True)
        state["delta"] = delta
        opt = torch.optim.Adam([delta], lr=config.lr)
        kl_init: Tensor | None = None
        losses: list[float] = []
        init = state["init"].float()
        with frozen_for_capture(lm.model), torch.enable_grad():
            for it in range(config.steps):
                opt.zero_grad()
                h = upper.final_hidden(module, hook)
                kl_logp = F.log_softmax(lm.lens(h[-1, kl_index]), dim=-1)[None]
                if kl_init is None:
                    kl_init = kl_logp.detach().clone()
                logp = F.log_softmax(lm.lens(h[rows, cols]), dim=-1)
                nll = -logp.gather(-1, labels[:, None])[:, 0]
                nll_loss = nll.sum() / (n_target * len(rewrites))
                kl = config.kl_factor * F.kl_div(
                    kl_init, kl_logp, log_target=True, reduction="batchmean"
                )
                decay = config.weight_decay * (delta.norm() / init.norm() ** 2)
                loss = nll_loss + kl + decay
                losses.append(float(loss.detach()))
                if losses[-1] < config.stop_loss or it == config.steps - 1:
                    break
                loss.backward()
                opt.step()
                max_norm = config.clamp_norm_factor * init.norm()
                with torch.no_grad():
                    if delta.norm() > max_norm:
                        delta.mul_(max_norm / delta.norm())
    return ValueResult(init, delta.detach().clone(), losses)


# --------------------------------------------------------------------------- the update


def inverse_key_direction(c: Tensor, key: Tensor, ridge: float) -> Tensor:
    """C^-1 k with a small ridge (``ridge`` * mean diagonal of C), in float64."""
    c = c.double()
    reg = ridge * c.diagonal().mean() * torch.eye(c.shape[0], dtype=c.dtype)
    return torch.linalg.solve(c + reg, key.double().cpu())


@dataclass
class ROME:
    """ROME with r-ROME's consistent keys.

    Args:
        layer: block whose FF2 is edited (default: per model, see ``defaults.py``).
        v_steps, v_lr, v_weight_decay, clamp_norm_factor, kl_factor: value optimisation.
        context: (length, count) pairs of sampled prefixes averaged over (ROME: 5x10, 10x10).
        mom2_adjustment: use u = C^-1 k* (True) or u = k* (False).
        mom2_ridge: ridge added to C, relative to its mean diagonal.
        stats_samples, stats_length: the model-sampled text behind C (see ``stats.py``).
        seed: seed of the context prefixes.
    """

    layer: int | None = None
    v_steps: int = 20
    v_lr: float = 0.5
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 4.0
    kl_factor: float = 0.0625
    context: list[list[int]] = field(default_factory=lambda: [[5, 10], [10, 10]])
    mom2_adjustment: bool = True
    mom2_ridge: float = 1e-3
    stats_samples: int = 64
    stats_length: int = 256
    seed: int = 0
    name = "rome"

    def value_config(self, clamp: float | None = None) -> ValueConfig:
        """The value optimisation's settings (``clamp`` replaces ``clamp_norm_factor``)."""
        return ValueConfig(
            steps=self.v_steps,
            lr=self.v_lr,
            weight_decay=self.v_weight_decay,
            clamp_norm_factor=self.clamp_norm_factor if clamp is None else clamp,
            kl_factor=self.kl_factor,
        )

    def sample_config(self) -> SampleConfig:
        """How the text behind the key covariance C is sampled (``stats.py``)."""
        return SampleConfig(n_samples=self.stats_samples, length=self.stats_length)

    def __call__(self, lm: LensModel, requests: Sequence[RewriteRequest]) -> Edit:
        """Edit ``requests`` into FF2 of ``layer``; the model is restored, the change returned.

        Raises:
            InputError: a request without a locatable subject, or a layer the model lacks.
        """
        require_subjects(lm, requests, "ROME")
        layer = self.layer if self.layer is not None else editor_defaults(lm, "rome")["layer"]
        matrix = ff2(lm, layer)
        layer = matrix.resolved.layer
        prefixes = context_prefixes(lm, self.context, self.seed)
        c = (
            second_moments(lm, [layer], self.sample_config())[layer]
            if self.mom2_adjustment
            else None
        )
        total: Tensor | None = None
        per: list[dict[str, Any]] = []
        for request in requests:  # several requests: independent rank-one updates, summed
            key = average_key(lm, matrix, request, prefixes)
            value = optimize_value(lm, matrix.module, layer, request, prefixes, self.value_config())
            u = inverse_key_direction(c, key, self.mom2_ridge) if c is not None else key.double()
            u = u / u.norm()
            with torch.no_grad():
                current = matrix.module(key[None].to(matrix.weight.dtype))[0].double()
            right = (value.target.double().cpu() - current.cpu()) / torch.dot(key.double().cpu(), u)
            delta = matrix.outer(u.float(), right.float())
            total = delta if total is None else total + delta
            per.append(
                {
                    "v_losses": value.losses,
                    "delta_norm": float(value.delta.norm()),
                    "key_norm": float(key.norm()),
                }
            )
        deltas = {matrix.param: total} if total is not None else {}
        info: dict[str, Any] = {"per_request": per, "n_prefixes": len(prefixes)}
        if len(per) == 1:
            info.update(per[0])
        return Edit.from_deltas(
            lm, deltas, self.name, hparams_of(self, layer=layer), requests, info
        )
