"""The logit lens, applied to forward inputs and to VJPs alike (paper, Eq. 7).

LL(v) = softmax(final_norm(v) D). Gradients go through exactly the same function as hidden states.
The paper reads FF1 inputs x_i by their *most* probable tokens and FF2 VJPs delta_i by their *least*
probable ones, because gradient descent subtracts delta_i (Lemma 5.1).

Ranks are counted on logits (the number of tokens with a strictly larger logit), which is the
paper's "strictly larger probability" without float32 softmax underflow creating false ties.
Projection is batched and chunked: the whole (layer x position x matrix) grid is one call.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

if TYPE_CHECKING:
    from backward_lens.models import LensModel


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
    """Frozen final norm + unembedding (+ Gemma's logit soft-capping) of one model."""

    def __init__(
        self,
        final_norm: list[nn.Module],
        unembed: Tensor,
        bias: Tensor | None = None,
        softcap: float | None = None,
    ) -> None:
        super().__init__()
        self.final_norm = nn.ModuleList(final_norm)
        self.unembed = unembed  # [V, d], shared with the model (never copied or modified)
        self.bias = bias
        self.softcap = softcap

    @classmethod
    def from_model(cls, lm: LensModel) -> VocabularyLens:
        weight, bias = lm.arch.unembedding()
        return cls(lm.arch.final_norm_modules(), weight, bias, lm.arch.logit_softcap())

    @property
    def vocab_size(self) -> int:
        return int(self.unembed.shape[0])

    @torch.no_grad()
    def logits(self, vectors: Tensor, normalized: bool = False) -> Tensor:
        """Lens logits of ``vectors`` [..., d] -> [..., V] (float32), without a graph."""
        return self(vectors, normalized)

    def forward(self, vectors: Tensor, normalized: bool = False) -> Tensor:
        """Lens logits of ``vectors`` [..., d] -> [..., V] (float32), differentiable: the
        model's own head applied to hidden states (used to optimise through it)."""
        h = vectors.to(self.unembed.device, self.unembed.dtype)
        if normalized:
            h = F.normalize(h, dim=-1)
        for module in self.final_norm:
            h = module(h)
        out = F.linear(h, self.unembed, self.bias).float()
        if self.softcap:
            out = torch.tanh(out / self.softcap) * self.softcap
        return out

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
    ) -> Projection:
        """Top-k, bottom-k and target rank of every row of ``vectors`` [N, d].

        Args:
            vectors: the vectors to read, [N, d] (x_i, delta_i, neurons...).
            k: how many top and bottom tokens to keep.
            target: a token id for all rows, or one id per row ([N]); None to skip ranks.
            normalized: L2-normalise each vector first (the paper's normalised logit lens, App. H).
            chunk_size: rows per matmul (default: about 8M logits, so each chunk stays in cache
                and memory is bounded for large vocabularies).
        """
        vectors = vectors.reshape(-1, vectors.shape[-1])
        n = vectors.shape[0]
        k = min(k, self.vocab_size)
        targets: Tensor | None = None
        if target is not None:
            targets = torch.as_tensor(target, device=self.unembed.device).reshape(-1)
            targets = targets.expand(n) if targets.numel() == 1 else targets
        if chunk_size is None:
            chunk_size = max(16, (1 << 23) // self.vocab_size)
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
