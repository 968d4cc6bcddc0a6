"""The real tokenizers bundled in ``tests/data/tokenizers`` (vocab-only GGUF files, see its README).

Converting a GGUF vocabulary takes 1-15 s, so each is converted once and kept as a plain
tokenizer folder under pytest's cache (``.pytest_cache/d/tokenizers``), keyed by the file's size.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer

from backward_lens.models import quiet_transformers

DATA = Path(__file__).resolve().parent / "data" / "tokenizers"
CACHE = Path(__file__).resolve().parents[1] / ".pytest_cache" / "d" / "tokenizers"

REAL_TOKENIZERS: dict[str, str] = {
    "gpt-2": "gpt2",  # byte-level BPE (the paper's GPT family)
    "llama-spm": "llama",  # Llama-2: SentencePiece, BOS (the paper's Llama family)
    "llama-bpe": "llama",  # Llama-3: byte-level BPE, 128k vocabulary
    "phi-3": "phi3",  # SentencePiece, BOS; " Rome" alone is ['▁', '▁Rome']
}
"""Tokenizer name -> the ``tests.tiny`` model family it is paired with."""


@functools.cache
def real_tokenizer(name: str) -> Any:
    """The tokenizer of ``ggml-vocab-{name}.gguf`` (with a pad token, as ``wrap`` sets it)."""
    gguf = DATA / f"ggml-vocab-{name}.gguf"
    folder = CACHE / f"{name}-{gguf.stat().st_size}"
    with quiet_transformers():
        if (folder / "tokenizer_config.json").is_file():
            try:
                return AutoTokenizer.from_pretrained(str(folder))
            except (OSError, ValueError):
                pass
        tok = AutoTokenizer.from_pretrained(str(DATA), gguf_file=gguf.name)
        folder.mkdir(parents=True, exist_ok=True)
        tok.save_pretrained(str(folder))
    return tok
