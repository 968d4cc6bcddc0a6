"""The logit lens, applied to forward inputs and to VJPs alike (paper, Eq. 7).

LL(v) = softmax(final_norm(v) D). Gradients go through exactly the same function as hidden states.
The paper reads FF1 inputs x_i by their *most* probable tokens and FF2 VJPs delta_i by their *least*
probable ones, because gradient descent subtracts delta_i (Lemma 5.1).

Ranks are counted on logits (the number of tokens with a strictly larger logit), which is the
paper's "strictly larger probability" without float32 softmax underflow creating false ties.
Projection is batched and chunked: the whole (layer x position x matrix) grid is one call, its
logits computed a memory budget at a time (:data:`LOGIT_CHUNK_BYTES`).

Precision: logits are always computed in float32. For a bfloat16 or float16 model the final norm
and the unembedding run on float32 copies of their weights, built once, on first use, and rebuilt
only when a weight changes (tracked by each tensor's version counter, so an edit applied in place
is seen). We keep a copy rather than casting per chunk because ``project`` runs many chunks per
call; the copy costs 4 bytes per unembedding entry (0.5 GB for a 32k x 4096 head) on the head's
device. A float32 model uses its own weights, uncopied.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from backward_lens.adapters import Architecture
from backward_lens.errors import PlacementError

LOGIT_CHUNK_BYTES = 32 << 20
"""Memory budget of one projection chunk's float32 logits (32 MiB: 170 rows of a 49k
vocabulary, 256 of a 32k one); ``VocabularyLens.project(max_chunk_bytes=...)`` overrides it."""


@dataclass
class Projection:
    """Lens readings of N vectors.

    Attributes:
        top_ids, top_probs: the k most probable tokens of each vector, [N, k].
        bottom_ids, bottom_probs: the k least probable tokens, least probable first, [N, k].
        target_rank: rank of each vector's target token (0 = most probable), [N]; None if no target.
        norm: L2 norm of each input vector (before any normalisation), [N].
    """

    top_ids: Tensor
    top_probs: Tensor
    bottom_ids: Tensor
    bottom_probs: Tensor
    target_rank: Tensor | None
    norm: Tensor

    def reshape(self, *shape: int) -> Projection:
        """View every field with leading shape ``shape`` instead of N."""

        def r(t: Tensor | None) -> Tensor | None:
            return None if t is None else t.reshape(*shape, *t.shape[1:])

        return Projection(
            r(self.top_ids),  # type: ignore[arg-type]
            r(self.top_probs),  # type: ignore[arg-type]
            r(self.bottom_ids),  # type: ignore[arg-type]
            r(self.bottom_probs),  # type: ignore[arg-type]
            r(self.target_rank),
            r(self.norm),  # type: ignore[arg-type]
        )


class VocabularyLens(nn.Module):
    """Frozen final norm + unembedding (+ Gemma's logit soft-capping) of one model.

    Logits are float32 whatever the model's dtype (see the module docstring). Build it with
    :meth:`from_architecture`.
    """

    def __init__(
        self,
        final_norm: list[nn.Module],
        unembed: Tensor,
        bias: Tensor | None = None,
        softcap: float | None = None,
    ) -> None:
        """Wrap the model's own head modules and weights (shared, never modified).

        Args:
            final_norm: the modules applied before the LM head, in order.
            unembed: the decoding matrix, [V, d].
            bias: the LM head's bias, [V], or None.
            softcap: Gemma's final logit soft-capping, or None.
        """
        super().__init__()
        self.final_norm = nn.ModuleList(final_norm)
        self.unembed = unembed  # [V, d], shared with the model (never modified)
        self.bias = bias
        self.softcap = softcap
        # float32 mirrors of half-precision weights: key -> (source identity, float32 copy)
        self._float32: dict[str, tuple[tuple[object, ...], Any]] = {}

    @classmethod
    def from_architecture(cls, arch: Architecture) -> VocabularyLens:
        """The lens of the model ``arch`` is bound to: its final norm, LM head and soft-cap.

        Args:
            arch: the model's architecture adapter (``LensModel.arch``).

        Returns:
            A lens sharing the model's head weights (never modified), [V, d].

        Raises:
            UnsupportedArchitectureError: the model has no LM head.
        """
        weight, bias = arch.unembedding()
        return cls(arch.final_norm_modules(), weight, bias, arch.logit_softcap())

    @property
    def vocab_size(self) -> int:
        """V, the number of rows of the decoding matrix."""
        return int(self.unembed.shape[0])

    @torch.no_grad()
    def logits(self, vectors: Tensor, normalized: bool = False) -> Tensor:
        """Lens logits of ``vectors`` [..., d] -> [..., V] (float32), without a graph."""
        return self(vectors, normalized)

    def forward(self, vectors: Tensor, normalized: bool = False) -> Tensor:
        """Lens logits of ``vectors`` [..., d] -> [..., V], float32 and differentiable.

        The model's own head applied to hidden states (used to optimise through it).

        Gradients flow to ``vectors`` in every dtype, and to the head's weights only for a
        float32 model (a half-precision model's head runs on detached float32 copies).
        """
        norms, weight, _ = self._float32_head()
        h = vectors.to(weight.device, weight.dtype)  # float32, or float64 for a float64 model
        if normalized:
            h = F.normalize(h, dim=-1)
        for module in norms:
            h = module(h)
        return self.unembed_logits(h)

    def unembed_logits(self, hidden: Tensor) -> Tensor:
        """The LM head alone on final-normed hidden states (the head's own input).

        [..., d] -> [..., V]: unembedding, bias and soft-capping in float32, differentiable with
        respect to ``hidden``. ``capture`` computes a half-precision model's loss with it, so
        the loss and its VJPs start in float32.
        """
        _, weight, bias = self._float32_head()
        out = F.linear(hidden.to(weight.device, weight.dtype), weight, bias)
        if self.softcap:
            out = torch.tanh(out / self.softcap) * self.softcap
        return out.float()

    def _float32_head(self) -> tuple[list[nn.Module], Tensor, Tensor | None]:
        """The final norm modules, unembedding and bias in float32.

        Copies of half-precision weights; a float32 or float64 model's are used as they are.
        """
        if self.unembed.device.type == "meta":
            raise PlacementError(
                "the LM head was offloaded to disk (meta device); the lens needs it in memory: "
                "raise max_memory or keep lm_head on a device in the device_map"
            )
        norms = [self._float32_module(k, m) for k, m in enumerate(self.final_norm)]
        weight = self._float32_tensor("unembed", self.unembed)
        bias = None if self.bias is None else self._float32_tensor("bias", self.bias)
        return norms, weight, bias

    def _float32_tensor(self, key: str, t: Tensor) -> Tensor:
        if t.dtype in _FULL:
            return t
        ident = _identity(t)
        cached = self._float32.get(key)
        if cached is None or cached[0] != ident:
            cached = (ident, t.detach().float())
            self._float32[key] = cached
        return cached[1]

    def _float32_module(self, k: int, module: nn.Module) -> nn.Module:
        tensors = [*module.parameters(), *module.buffers()]
        if all(t.dtype in _FULL or not t.is_floating_point() for t in tensors):
            return module
        if any(t.device.type == "meta" for t in tensors):
            # offloaded: accelerate's hook loads the weights for each call; a copy could not.
            # The norm then runs in the model's dtype on float32 input (RMSNorms upcast).
            return module
        ident = tuple(_identity(t) for t in tensors)
        cached = self._float32.get(f"norm{k}")
        if cached is None or cached[0] != ident:
            twin = copy.deepcopy(module)
            _remove_hooks(twin)
            cached = (ident, twin.float().requires_grad_(False))
            self._float32[f"norm{k}"] = cached
        return cached[1]

    def probs(self, vectors: Tensor, normalized: bool = False) -> Tensor:
        """LL(v) = softmax of the lens logits, [..., V]."""
        return self.logits(vectors, normalized).softmax(-1)

    @torch.no_grad()
    def project(
        self,
        vectors: Tensor,
        k: int = 5,
        target: int | Tensor | None = None,
        normalized: bool = False,
        chunk_size: int | None = None,
        max_chunk_bytes: int | None = None,
    ) -> Projection:
        """Top-k, bottom-k and target rank of every row of ``vectors`` [N, d].

        Args:
            vectors: the vectors to read, [N, d] (x_i, delta_i, neurons...).
            k: how many top and bottom tokens to keep.
            target: a token id for all rows, or one id per row ([N]); None to skip ranks.
            normalized: L2-normalise each vector first (the paper's normalised logit lens, App. H).
            chunk_size: rows per matmul; default: as many as fit ``max_chunk_bytes``.
            max_chunk_bytes: memory budget of one chunk's float32 logits, on the head's device
                (GPU or CPU alike; default :data:`LOGIT_CHUNK_BYTES`, 32 MiB). The peak of a
                call is about twice this (the logits and their comparison with the target)
                plus the outputs, whatever N is; at least one row is projected per chunk.
        """
        vectors = vectors.reshape(-1, vectors.shape[-1])
        n = vectors.shape[0]
        k = min(k, self.vocab_size)
        targets: Tensor | None = None
        if target is not None:
            targets = torch.as_tensor(target, device=self.unembed.device).reshape(-1)
            targets = targets.expand(n) if targets.numel() == 1 else targets
        if chunk_size is None:
            budget = LOGIT_CHUNK_BYTES if max_chunk_bytes is None else max_chunk_bytes
            chunk_size = max(1, budget // (4 * self.vocab_size))
        parts: list[tuple[Tensor, ...]] = []
        for start in range(0, n, chunk_size):
            logits = self.logits(vectors[start : start + chunk_size], normalized)
            lse = logits.logsumexp(-1, keepdim=True)
            top_v, top_i = logits.topk(k, dim=-1)
            bot_v, bot_i = logits.topk(k, dim=-1, largest=False)
            if targets is not None:
                t = targets[start : start + chunk_size]
                t_logit = logits.gather(-1, t[:, None])
                rank = (logits > t_logit).sum(-1, dtype=torch.int32).long()
            else:
                rank = torch.zeros(0)
            parts.append((top_i, (top_v - lse).exp(), bot_i, (bot_v - lse).exp(), rank))
        cat = [torch.cat([p[j] for p in parts]).cpu() for j in range(5)] if parts else None
        if cat is None:
            empty = torch.zeros(0, k)
            return Projection(empty.long(), empty, empty.long(), empty, None, torch.zeros(0))
        return Projection(
            cat[0],
            cat[1],
            cat[2],
            cat[3],
            cat[4] if targets is not None else None,
            vectors.float().norm(dim=-1).cpu(),
        )

    @torch.no_grad()
    def rank_of(self, vectors: Tensor, token: int, normalized: bool = False) -> Tensor:
        """Rank of ``token`` in the projection of each row of ``vectors`` [N, d] -> [N]."""
        logits = self.logits(vectors, normalized)
        return (logits > logits[..., token : token + 1]).sum(-1).cpu()


_FULL = (torch.float32, torch.float64)


def _identity(t: Tensor) -> tuple[object, ...]:
    """What changes when a tensor is replaced or modified in place (its version counter)."""
    return (t.data_ptr(), t._version, t.device, t.dtype, tuple(t.shape))


def _remove_hooks(module: nn.Module) -> None:
    """Drop accelerate's device-placement hooks from a copied module (it runs where it lies)."""
    if any(hasattr(m, "_hf_hook") for m in module.modules()):
        from accelerate.hooks import remove_hook_from_module

        remove_hook_from_module(module, recurse=True)
