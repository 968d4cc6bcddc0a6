"""A tiny random Llama with a tiny byte-level BPE tokenizer, saved as a model folder.

Used by the bad-input and data-safety tests as ``--model DIR``: no download, no real weights,
loads in well under a second. The tokenizer is trained in code on a few sentences (byte-level,
so every string encodes); the model is random, so its outputs mean nothing, which is all the
CLI plumbing needs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import transformers as tf

from tests.tiny import GATED

_TEXT = [
    "The Eiffel Tower is located in the city of Paris Rome London Berlin",
    "Danielle Darrieux's mother tongue is French English German",
    "The Louvre is located in Paris. The Colosseum is in Rome.",
]


def make_tokenizer() -> tf.PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with a few hundred tokens, BOS/EOS/PAD set."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(_TEXT, trainer)
    return tf.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="</s>"
    )


def save_tiny_llama(folder: Path, seed: int = 0) -> Path:
    """Write a 3-layer, width-32 random Llama and its tokenizer to ``folder``; return it."""
    tokenizer = make_tokenizer()
    torch.manual_seed(seed)
    config = tf.LlamaConfig(
        **{**GATED, "vocab_size": len(tokenizer)},
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = tf.LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.2)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def tiny_lens_model(folder: Path) -> Any:
    """The saved tiny model loaded as a :class:`~backward_lens.models.LensModel`."""
    from backward_lens.models import load_model

    return load_model(str(folder))
