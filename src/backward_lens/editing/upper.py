"""Re-running only the blocks above a layer, with a change added to one module's output.

One full forward pass records, for every block from ``layer`` up, the exact positional and
keyword arguments the model passed to it (attention masks, rotary embeddings... whatever the
family uses) and the hidden state entering block ``layer``. A re-run then calls those blocks
directly on that hidden state, so no module path and no family-specific mask code is needed, and
the blocks below ``layer`` are not run again.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from backward_lens.models import LensModel


class UpperBlocks:
    """Cached inputs of blocks ``layer..L-1`` for one unpadded sequence (batch of one).

    Attributes:
        logits: the unedited model's logits at the last position, [V].
    """

    def __init__(self, lm: LensModel, layer: int, ids: Sequence[int]) -> None:
        self.lm = lm
        self.layer = layer
        self.blocks = lm.arch.layers
        self.length = len(ids)
        self._calls: dict[int, tuple[tuple[Any, ...], dict[str, Any]]] = {}
        handles = [
            self.blocks[k].register_forward_pre_hook(self._keep(k), with_kwargs=True)
            for k in range(layer, len(self.blocks))
        ]
        try:
            with torch.no_grad():
                input_ids = torch.tensor([list(ids)], device=lm.device)
                self.logits: Tensor = lm.model(input_ids=input_ids, use_cache=False).logits[0, -1]
        finally:
            for h in handles:
                h.remove()
        args, kwargs = self._calls[layer]
        self.hidden: Tensor = args[0] if args else kwargs["hidden_states"]

    def _keep(self, k: int):
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            self._calls[k] = (args, dict(kwargs))

        return hook

    @torch.no_grad()
    def run(self, module: nn.Module | None = None, add: Tensor | None = None) -> Tensor:
        """Last-position logits [V] after adding ``add`` ([T, d_out]) to ``module``'s output.

        ``module`` must belong to a block at or above ``layer``.
        """
        handle = None
        if module is not None and add is not None:

            def hook(mod: nn.Module, args: tuple[Any, ...], output: Tensor) -> Tensor:
                return output + add.to(output.dtype).reshape(output.shape)

            handle = module.register_forward_hook(hook)
        try:
            h = self.hidden
            for k in range(self.layer, len(self.blocks)):
                args, kwargs = self._calls[k]
                if args:
                    out = self.blocks[k](h, *args[1:], **kwargs)
                else:
                    out = self.blocks[k](**{**kwargs, "hidden_states": h})
                h = out[0] if isinstance(out, tuple) else out
        finally:
            if handle is not None:
                handle.remove()
        return self.lm.lens.logits(h[0, -1])
