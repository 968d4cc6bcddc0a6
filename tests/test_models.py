"""Model loading: built-ins, errors, and the GGUF conversion cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers as tf

from backward_lens.adapters import ADAPTERS, Architecture, supported_model_types
from backward_lens.errors import ModelNotFoundError, UnsupportedArchitectureError
from backward_lens.gguf_cache import cache_entry, cache_entry_is_valid
from backward_lens.models import BUILTIN_MODELS, load_model, wrap


def test_unknown_name_missing_file_and_bad_folder(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="built-in"):
        load_model("no-such-model-anywhere")
    with pytest.raises(ModelNotFoundError, match="no such GGUF"):
        load_model(str(tmp_path / "missing.gguf"))
    with pytest.raises(ModelNotFoundError, match=r"config\.json"):
        load_model(str(tmp_path))


def test_unsupported_architecture_names_the_supported_ones(tokenizer) -> None:
    config = tf.BloomConfig(n_layer=1, hidden_size=16, n_head=2, vocab_size=100)
    model = tf.AutoModelForCausalLM.from_config(config)
    with pytest.raises(UnsupportedArchitectureError) as err:
        wrap(model, tokenizer)
    message = str(err.value)
    assert "'bloom'" in message and "llama" in message and "ADAPTERS" in message


def test_adapter_table_covers_the_required_families() -> None:
    required = {
        "gpt2",
        "gptj",
        "gpt_neox",
        "opt",
        "llama",
        "mistral",
        "qwen2",
        "qwen3",
        "gemma",
        "gemma2",
        "gemma3_text",
        "phi3",
        "olmo2",
    }
    assert required <= set(supported_model_types()) == set(ADAPTERS)


@pytest.mark.slow
def test_builtin_default_model_loads(smollm2) -> None:
    assert smollm2.name == "smollm2-135m"
    assert smollm2.n_layers == 30 and smollm2.vocab_size == 49152
    assert isinstance(smollm2.arch, Architecture)
    assert smollm2.model.config.model_type == "llama"


@pytest.mark.slow
def test_cache_detects_corruption_and_rebuilds(tmp_path: Path, monkeypatch, smollm2) -> None:
    """A damaged cache entry is never used: it is detected and converted again."""
    monkeypatch.setenv("BACKWARD_LENS_CACHE", str(tmp_path))
    gguf = BUILTIN_MODELS["smollm2-135m"].gguf_path()
    entry = cache_entry(gguf, torch.float32)
    first = load_model("smollm2-135m")  # converts into tmp_path
    assert cache_entry_is_valid(entry) and first.n_layers == 30
    del first  # its weights are memory-mapped from the file we are about to damage
    weights = entry / "model.safetensors"
    # flip one byte in the middle of the weights: same size, different content
    with weights.open("r+b") as f:
        f.seek(weights.stat().st_size // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert not cache_entry_is_valid(entry)
    second = load_model("smollm2-135m")  # rebuilds
    assert cache_entry_is_valid(entry)
    # the rebuilt entry equals the session model (another cache, same conversion)
    ref = dict(smollm2.model.named_parameters())
    assert all(torch.equal(p, ref[n]) for n, p in second.model.named_parameters())
    # a partial entry (manifest missing, e.g. a crash mid-write) is refused too
    assert json.loads((entry / "manifest.json").read_text())["files"]
    (entry / "manifest.json").unlink()
    assert not cache_entry_is_valid(entry)


def test_local_folder_loads_like_the_hub(tmp_path: Path, tokenizer) -> None:
    """A folder written by save_pretrained is what a user with a hub download has."""
    config = tf.LlamaConfig(
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=64,
    )
    model = tf.AutoModelForCausalLM.from_config(config)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    lm = load_model(str(tmp_path))
    assert lm.n_layers == 2 and lm.context_length == 64
    for (n, p), (_, q) in zip(model.named_parameters(), lm.model.named_parameters(), strict=True):
        assert torch.equal(p, q), n


@pytest.mark.slow
def test_gguf_path_uses_the_same_conversion(smollm2) -> None:
    gguf = BUILTIN_MODELS["smollm2-135m"].gguf_path()
    lm = load_model(str(gguf))
    ref = dict(smollm2.model.named_parameters())
    assert all(torch.equal(p, ref[n]) for n, p in lm.model.named_parameters())


@pytest.mark.slow
def test_explanation_dataframe(smollm2) -> None:
    from backward_lens.explain import explain

    expl = explain(smollm2, "The capital of France is", " Rome", layers=[0, -1])
    df = expl.to_dataframe()
    n = len(expl.tokens)
    assert len(df) == 2 * 2 * n
    last = df[(df.layer == smollm2.n_layers - 1) & (df.matrix == "ff2")]
    assert list(last["rank"].unique()) == [1]
    assert last["token"].tolist() == expl.tokens
