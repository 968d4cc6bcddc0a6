"""Tokenizers for the tests: one built in code (unit tier) and the bundled real ones (integration).

:func:`code_tokenizer` trains a small byte-level BPE (GPT-2/SmolLM2 style: ``Ġ`` marks a leading
space, no BOS added, the same special tokens as SmolLM2) on the bundled CounterFact sample and a
few sentences the tests use, in about 0.2 s with nothing outside the repository. The tiny random
models of ``tests.tiny`` take its vocabulary (2,048 tokens instead of SmolLM2's 49,152), so the
unit tier needs no real model and runs fast. Common words (" Rome", " Paris", " Tower") are one
token each, as in SmolLM2; rare names split (" Darrieux" -> three pieces).

:func:`real_tokenizer` loads the real tokenizers bundled in ``tests/data/tokenizers`` (vocab-only
GGUF files, see its README). Converting a GGUF vocabulary takes 1-15 s, so each is converted
once and kept as a plain tokenizer folder under pytest's cache (``.pytest_cache/d/tokenizers``),
keyed by the file's size. Tests that use them belong to the integration tier (see
``tests/conftest.py``).
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerFast

from backward_lens.models import quiet_transformers

DATA = Path(__file__).resolve().parent / "data" / "tokenizers"
CACHE = Path(__file__).resolve().parents[1] / ".pytest_cache" / "d" / "tokenizers"
COUNTERFACT_SAMPLE = Path(__file__).resolve().parent / "data" / "counterfact-edit-sample.json"

CODE_VOCAB_SIZE = 2048
"""Vocabulary of :func:`code_tokenizer` (special tokens included)."""

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
"""SmolLM2's special tokens, with SmolLM2's ids 0, 1, 2 (BOS ``<|im_start|>``, EOS = pad
``<|im_end|>``)."""

TEST_SENTENCES = (
    "The Eiffel Tower is located in the city of Paris. The Eiffel Tower is in Rome.",
    "Where is the Eiffel Tower? It is in Paris, the capital of France.",
    "The Louvre is located in the city of Paris. The Colosseum is in Rome, Italy.",
    "Big Ben is in London. The capital of Japan is Tokyo. New York City is in the United States.",
    "Paris is the capital of France. Her name is Danielle. Her mother tongue is French or English.",
    "The capital of Germany is Berlin. The capital of Spain is Madrid. Sweden, Google, Apple.",
)
"""Sentences the tests use, weighted so that their words become single tokens, as in SmolLM2."""

COMMON_WORDS = """
the of and to in is was for on that with as by at from his her it an are were be this which
or has had have not but he she they their its one two three first new also after who more
other can all into been time when there would some only most than over many may city year
years people used made such where world part state between no up out so about what
during under known then later each through since before while name born capital country
language music film team play plays played work works worked home river king war church
city town village located lives lived died death son daughter father mother wife husband
family group company university school college museum tower bridge street island lake
north south east west big small large old long great good best high low little young man
woman men women day night water fire house car book word words language languages speaks
speak spoken native official religion citizen citizenship position club label genre field
instrument occupation profession developed produced created founded written owned based
headquarters located held holds position continent region area border near capital of
Rome Paris London Berlin Madrid Tokyo Moscow Italy France Germany Spain Japan Russia China
India Canada Australia England Sweden Norway Finland Poland Greece Egypt Brazil Mexico
English French German Spanish Italian Japanese Russian Chinese Dutch Swedish Latin Arabic
Christianity Islam Judaism Buddhism Catholic Microsoft Apple Google Nokia Toyota Honda BBC
NBC CBS ABC Fox piano guitar violin jazz rock opera football baseball basketball soccer
hockey tennis golf chess physics chemistry mathematics philosophy politics science history
"""
"""Frequent words (one token each in SmolLM2), so that everyday targets are one token here too."""

_SENTENCE_WEIGHT = 20
_FIELDS = ("prompt", "rephrase_prompt", "locality_prompt")
_ANSWERS = ("subject", "target_new", "ground_truth", "locality_ground_truth")


def _corpus() -> list[str]:
    """The training text of :func:`code_tokenizer`.

    Every prompt and answer of the bundled CounterFact sample (answers with a leading space, as
    they follow a prompt), then :data:`TEST_SENTENCES`.
    """
    records = json.loads(COUNTERFACT_SAMPLE.read_text(encoding="utf-8"))
    texts = [r[f] for r in records for f in _FIELDS if isinstance(r.get(f), str)]
    texts += [" " + r[f].strip() for r in records for f in _ANSWERS if isinstance(r.get(f), str)]
    words = [" " + w for w in COMMON_WORDS.split()]
    return texts + (list(TEST_SENTENCES) + words) * _SENTENCE_WEIGHT


@functools.cache
def code_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer of :data:`CODE_VOCAB_SIZE` tokens, trained in code.

    Deterministic (the same vocabulary and merges every call and every run); every string
    encodes (byte-level), ``decode(encode(text)) == text``, and offsets are available (fast
    tokenizer). Cached: treat the returned object as read-only, or deep-copy it first.

    Returns:
        The tokenizer, with ``bos_token`` ``<|im_start|>`` (not added by ``__call__``, as in
        SmolLM2) and ``eos_token`` = ``pad_token`` = ``<|im_end|>``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=CODE_VOCAB_SIZE,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    raw.train_from_iterator(_corpus(), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=raw,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
    )


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
