"""Small randomly initialised models of every supported family (exact for gradient algebra).

The unit tier pairs them with the tokenizer built in code (``tests.tokenizers.code_tokenizer``,
2,048 tokens); the integration tier also with real tokenizers (``real_tokenizer``, SmolLM2's).
"""

from __future__ import annotations

from typing import Any

import torch
import transformers as tf

from backward_lens.models import LensModel, wrap

V = 2048  # a placeholder: make_tiny gives each model its tokenizer's vocabulary

GATED = dict(
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    vocab_size=V,
    max_position_embeddings=128,
)

TINY_CONFIGS: dict[str, Any] = {
    "gpt2": lambda: tf.GPT2Config(
        n_layer=3,
        n_embd=32,
        n_head=4,
        vocab_size=V,
        n_positions=128,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    ),
    "gptj": lambda: tf.GPTJConfig(
        n_layer=3, n_embd=32, n_head=4, rotary_dim=4, vocab_size=V, n_positions=128
    ),
    "gpt_neox": lambda: tf.GPTNeoXConfig(
        num_hidden_layers=3,
        hidden_size=32,
        num_attention_heads=4,
        intermediate_size=48,
        vocab_size=V,
        max_position_embeddings=128,
    ),
    "opt": lambda: tf.OPTConfig(
        num_hidden_layers=3,
        hidden_size=32,
        num_attention_heads=4,
        ffn_dim=48,
        vocab_size=V,
        max_position_embeddings=128,
        word_embed_proj_dim=32,
        dropout=0.0,
    ),
    "llama": lambda: tf.LlamaConfig(**GATED),
    "mistral": lambda: tf.MistralConfig(**GATED),
    "qwen2": lambda: tf.Qwen2Config(**GATED),
    "qwen3": lambda: tf.Qwen3Config(**GATED),
    "gemma": lambda: tf.GemmaConfig(**GATED),
    "gemma2": lambda: tf.Gemma2Config(**GATED, final_logit_softcapping=30.0),
    "gemma3_text": lambda: tf.Gemma3TextConfig(**GATED, final_logit_softcapping=30.0),
    "phi3": lambda: tf.Phi3Config(**GATED, pad_token_id=0),
    "olmo2": lambda: tf.Olmo2Config(**GATED),
}


def make_tiny(model_type: str, tokenizer: Any, seed: int = 0) -> LensModel:
    """A random ``model_type`` model with 3 layers and width 32, in float32 eval mode.

    Its vocabulary is the tokenizer's (``len(tokenizer)``, special tokens included).
    """
    torch.manual_seed(seed)
    config = TINY_CONFIGS[model_type]()
    config.vocab_size = len(tokenizer)
    config.tie_word_embeddings = model_type in ("gpt2", "gemma", "gemma2", "gemma3_text")
    model = tf.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Random init puts small weights everywhere; scale the unembedding so softmax is not flat.
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.2)
    return wrap(model, tokenizer, name=f"tiny-{model_type}")
