"""Second moments of FF2 inputs ("key covariance" C = E[k k^T]) for ROME and MEMIT.

ROME and MEMIT estimate C over Wikipedia text, which is not available offline. Here the text is
sampled from the model itself: ``n_samples`` continuations of short generic openings ("The",
"In", "According to"...), top-k sampling with a fixed seed, ``length`` new tokens each. The sample
is generated once per model and cached; C for a layer is then one forward pass over it (stopped
right after the deepest layer needed), counting every position except the first of each sequence
(first positions carry the huge "attention sink" activations of many models and would dominate C).

Both the token sample and each layer's C are cached as safetensors under
``cache_dir() / "stats"``, keyed by model name, architecture fingerprint, a digest of the weights,
the layer and the sample configuration, and written atomically.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from backward_lens.batching import Hooks, by_position, eval_mode, pad_batch, pad_id
from backward_lens.editing.base import model_fingerprint
from backward_lens.editing.matrix import ff2
from backward_lens.gguf_cache import cache_dir
from backward_lens.io import atomic_write
from backward_lens.models import LensModel
from backward_lens.tokens import encode_text

OPENINGS = (
    "The", "In", "A", "It", "This", "He", "She", "They", "When", "After", "According to",
    "During", "Many", "One of the", "There", "Some",
)  # fmt: skip


@dataclass(frozen=True)
class SampleConfig:
    """How the text behind C is sampled from the model.

    Attributes:
        n_samples: number of sampled texts.
        length: new tokens per text (generation stops earlier at end-of-sequence).
        top_k: top-k sampling (temperature 1).
        seed: RNG seed (the sample is deterministic for a given model and config).
        batch_size: texts generated / read per batch.
    """

    n_samples: int = 64
    length: int = 256
    top_k: int = 40
    seed: int = 0
    batch_size: int = 32

    def key(self) -> str:
        """The configuration's part of a cache file name."""
        return f"n{self.n_samples}-len{self.length}-k{self.top_k}-s{self.seed}"


def stats_cache_key(lm: LensModel) -> str:
    """The model's part of a statistics cache file name: name, architecture and weights.

    Returns:
        ``NAME-DIGEST``: the model name made file-safe (60 characters at most) and 16 hex digits
        of a SHA-256 over the architecture fingerprint and the first 1024 values of every weight.
    """
    h = hashlib.sha256(model_fingerprint(lm.model).encode())
    for name, p in lm.model.named_parameters():
        h.update(name.encode())
        h.update(p.detach().reshape(-1)[:1024].cpu().float().numpy().tobytes())
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", lm.name.rstrip("/").split("/")[-1])[:60]
    return f"{name}-{h.hexdigest()[:16]}"


def stats_dir() -> Path:
    """Where the samples and second moments are cached: ``cache_dir() / "stats"``."""
    return cache_dir() / "stats"


def _save(path: Path, tensors: dict[str, Tensor]) -> None:
    from safetensors.torch import save_file

    atomic_write(path, lambda tmp: save_file(tensors, str(tmp)))


def _load(path: Path) -> dict[str, Tensor] | None:
    from safetensors.torch import load_file

    if not path.is_file():
        return None
    try:
        return load_file(str(path))
    except Exception:  # a corrupt cache entry is recomputed
        return None


@torch.no_grad()
def sample_texts(lm: LensModel, config: SampleConfig) -> list[list[int]]:
    """Token ids of the sampled texts (cached on disk)."""
    path = stats_dir() / f"{stats_cache_key(lm)}-samples-{config.key()}.safetensors"
    cached = _load(path)
    if cached is not None:
        ids_list, sizes = cached["ids"].tolist(), cached["lengths"].tolist()
        out, start = [], 0
        for n in sizes:
            out.append(ids_list[start : start + n])
            start += n
        return out
    tok = lm.tokenizer
    eos = tok.eos_token_id
    texts: list[list[int]] = []
    gen = torch.Generator().manual_seed(config.seed)
    with eval_mode(lm.model), torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=gen)))
        batches = range(0, config.n_samples, config.batch_size)
        for start in tqdm(batches, desc="sampling text for key statistics", leave=False):
            n = min(config.batch_size, config.n_samples - start)
            prompts = [encode_text(tok, OPENINGS[(start + i) % len(OPENINGS)]) for i in range(n)]
            batch = pad_batch(prompts, pad_id(tok), device=lm.device)  # left padding: generation
            width = batch.shape[1]
            out = lm.model.generate(  # type: ignore[operator]
                input_ids=batch.input_ids,
                attention_mask=batch.attention_mask,
                do_sample=True,
                top_k=config.top_k,
                temperature=1.0,
                top_p=1.0,
                max_new_tokens=config.length,
                pad_token_id=pad_id(tok),
            )
            for b, p in enumerate(prompts):
                new = out[b, width:].tolist()
                if eos is not None and eos in new:
                    new = new[: new.index(eos)]
                texts.append(list(p) + new)
    lengths = torch.tensor([len(t) for t in texts], dtype=torch.long)
    flat = torch.tensor([i for t in texts for i in t], dtype=torch.long)
    _save(path, {"ids": flat, "lengths": lengths})
    return texts


class StopForward(Exception):
    """Raised by a hook to end a forward pass once the deepest needed layer has run."""


@torch.no_grad()
def second_moments(
    lm: LensModel, layers: Sequence[int], config: SampleConfig | None = None
) -> dict[int, Tensor]:
    """C = E[k k^T] of FF2 inputs k at each layer, [d_ff, d_ff] float64 (cached per layer)."""
    config = config or SampleConfig()
    key = stats_cache_key(lm)
    matrices = {layer: ff2(lm, layer) for layer in layers}
    paths = {
        layer: stats_dir() / f"{key}-L{m.resolved.layer}-{config.key()}.safetensors"
        for layer, m in matrices.items()
    }
    result: dict[int, Tensor] = {}
    for layer, path in paths.items():
        cached = _load(path)
        if cached is not None:
            result[layer] = cached["mom2"].double()
    missing = [layer for layer in matrices if layer not in result]
    if not missing:
        return result

    texts = [t for t in sample_texts(lm, config) if len(t) > 1]
    sums = {layer: torch.zeros(matrices[layer].d_in, matrices[layer].d_in, dtype=torch.float64)
            for layer in missing}  # fmt: skip
    count = 0
    current: dict[str, Tensor] = {}
    deepest = max(missing, key=lambda layer: matrices[layer].resolved.layer)

    def recorder(layer: int):
        def hook(module: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> None:
            b, t = current["shape"].tolist()
            x = by_position(args[0], (b, t))[current["keep"]]  # [N, d_ff]
            sums[layer] += (x.T.double() @ x.double()) if x.numel() else 0.0
            if layer == deepest:
                raise StopForward

        return hook

    with Hooks() as hooks, eval_mode(lm.model):
        for layer in missing:
            hooks.forward(matrices[layer].module, recorder(layer))
        for start in tqdm(
            range(0, len(texts), config.batch_size), desc="key statistics", leave=False
        ):
            batch = texts[start : start + config.batch_size]
            padded = pad_batch(batch, pad_id(lm.tokenizer), side="right", device=lm.device)
            ids, mask = padded.input_ids, padded.attention_mask
            keep = mask.bool().clone()
            keep[:, 0] = False  # skip each text's first position (attention sink)
            current["shape"] = torch.tensor(ids.shape)
            current["keep"] = keep
            count += int(keep.sum())
            with contextlib.suppress(StopForward):
                lm.model(input_ids=ids, attention_mask=mask, use_cache=False)
    for layer in missing:
        mom2 = sums[layer] / max(count, 1)
        _save(paths[layer], {"mom2": mom2.float(), "count": torch.tensor(count)})
        result[layer] = mom2.float().double()
    return result
