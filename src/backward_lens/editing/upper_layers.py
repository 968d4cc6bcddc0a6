"""Re-running only the blocks above a layer, with a change added to one module's output.

One full forward pass records, for every block from ``layer`` up, the exact positional and
keyword arguments the model passed to it (attention masks, rotary embeddings... whatever the
family uses) and the hidden state entering block ``layer``. A re-run then calls those blocks
directly on that hidden state, so no module path and no family-specific mask code is needed, and
the blocks below ``layer`` are not run again. Used by the adaptive shift (many candidate etas)
and by ROME/MEMIT's value optimisation (gradient steps through the upper blocks only).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from backward_lens.batching import Hooks, accepts
from backward_lens.models import LensModel

OutputHook = Callable[[nn.Module, tuple[Any, ...], Any], Any]


class UpperBlocks:
    """Cached inputs of blocks ``layer..L-1`` for one batch.

    ``ids`` is one unpadded sequence (a list of ints) or a [B, T] tensor with its
    ``attention_mask``; the cached masks are those of that batch, so re-runs must use it too.

    Attributes:
        logits: the unedited model's logits at the last position of the first row, [V].
        hidden: the hidden state entering block ``layer``, [B, T, d].
    """

    def __init__(
        self,
        lm: LensModel,
        layer: int,
        ids: Sequence[int] | Tensor,
        attention_mask: Tensor | None = None,
    ) -> None:
        """Run the model once on ``ids``, recording the inputs of blocks ``layer`` and up.

        Args:
            lm: the model.
            layer: the first block to re-run (0..n_layers-1).
            ids: one sequence of token ids, or a [B, T] batch.
            attention_mask: the batch's mask, [B, T] (None for one unpadded sequence).
        """
        self.lm = lm
        self.layer = layer
        self.blocks = lm.arch.layers
        input_ids = ids if isinstance(ids, Tensor) else torch.tensor([list(ids)])
        input_ids = input_ids.to(lm.device)
        self.length = int(input_ids.shape[1])
        self._calls: dict[int, tuple[tuple[Any, ...], dict[str, Any]]] = {}
        kwargs: dict[str, Any] = {"input_ids": input_ids, "use_cache": False}
        if accepts(lm.model, "logits_to_keep"):
            kwargs["logits_to_keep"] = 1  # only the last position is read
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask.to(lm.device)
        with Hooks() as hooks, torch.no_grad():
            for k in range(layer, len(self.blocks)):
                hooks.pre_forward(self.blocks[k], self._keep(k), with_kwargs=True)
            self.logits: Tensor = lm.model(**kwargs).logits[0, -1]
        args, block_kwargs = self._calls[layer]
        self.hidden: Tensor = args[0] if args else block_kwargs["hidden_states"]

    def _keep(self, k: int):
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            self._calls[k] = (args, dict(kwargs))

        return hook

    def final_hidden(
        self, module: nn.Module | None = None, hook: OutputHook | None = None
    ) -> Tensor:
        """The last block's output [B, T, d] (before the final norm), ``hook`` installed.

        ``hook`` is installed as a forward hook on ``module``, which must belong to a block at or
        above ``layer``.

        Runs under the caller's grad mode, so a hook that adds a trainable tensor can be
        optimised through the upper blocks only.
        """
        with Hooks() as hooks:
            if module is not None and hook is not None:
                hooks.forward(module, hook)
            h = self.hidden
            for k in range(self.layer, len(self.blocks)):
                args, kwargs = self._calls[k]
                if args:
                    out = self.blocks[k](h, *args[1:], **kwargs)
                else:
                    out = self.blocks[k](**{**kwargs, "hidden_states": h})
                h = out[0] if isinstance(out, tuple) else out
        return h

    @torch.no_grad()
    def run(self, module: nn.Module | None = None, add: Tensor | None = None) -> Tensor:
        """Last-position logits [V] (first row) after adding ``add`` [T, d_out] to an output.

        Args:
            module: the module whose output changes (a block at or above ``layer``), or None.
            add: the change of its output, [T, d_out], or None (no change).
        """
        hook: OutputHook | None = None
        if module is not None and add is not None:

            def hook(mod: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor:
                return output + add.to(output.dtype).reshape(output.shape)

        h = self.final_hidden(module, hook)
        return self.lm.lens.logits(h[0, -1])
