"""The table of editors, the one layer check, and notices through ``logging``.

Fast: a tiny random Llama built from its config (no tokenizer, no pretrained model).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import transformers as tf

from backward_lens.adapters import Architecture
from backward_lens.cli import show_notices
from backward_lens.editing import EDITORS, EditorSpec, get_editor
from backward_lens.editing.base import hparams_of
from backward_lens.editing.finetune import FineTune
from backward_lens.errors import InputError
from backward_lens.study.base import StudyOptions
from tests.tiny import TINY_CONFIGS


@pytest.fixture(scope="module")
def arch() -> Architecture:
    config = TINY_CONFIGS["llama"]()
    config.vocab_size = 64
    return Architecture(tf.AutoModelForCausalLM.from_config(config))


def test_every_name_is_one_table_entry() -> None:
    assert set(EDITORS) >= {"shift", "shift-adaptive", "rome", "memit", "ft", "ft-late"}
    assert {"ft-early", "ft-l"} <= set(EDITORS)
    for name, factory in EDITORS.items():
        if isinstance(factory, EditorSpec):
            assert get_editor(name).name == name


def test_ft_names_are_presets_of_one_editor() -> None:
    early, late, plain, ftl = (get_editor(n) for n in ("ft-early", "ft-late", "ft", "ft-l"))
    assert all(type(e) is FineTune for e in (early, late, plain, ftl))
    assert (early.defaults_key, late.defaults_key, plain.defaults_key) == (
        "ft-early",
        "ft-late",
        "ft-late",
    )
    assert (ftl.norm_constraint, ftl.defaults_key) == (5e-4, "ft-early")
    assert plain.norm_constraint is None
    assert get_editor("ft-l", norm_constraint=1e-3).norm_constraint == 1e-3  # user wins
    # the settings are not hyper-parameters: not recorded, not accepted from users
    assert set(hparams_of(early)) == {
        "layer",
        "lr",
        "steps",
        "norm_constraint",
        "early_stop_loss",
        "weight_decay",
    }
    for setting in ("name", "defaults_key"):
        with pytest.raises(InputError, match=f"unknown hyper-parameter.*{setting}.*'ft-early'"):
            get_editor("ft-early", **{setting: "x"})


def test_unknown_method_and_hyperparameter_are_one_line() -> None:
    with pytest.raises(InputError, match="unknown editing method 'nope'; available: ft, "):
        get_editor("nope")
    with pytest.raises(InputError, match=r"unknown hyper-parameter\(s\) lr for 'shift'"):
        get_editor("shift", lr=0.1)


def test_layer_index(arch: Architecture) -> None:
    assert arch.n_layers == 3
    assert [arch.layer_index(k) for k in (0, 2, -1, -3)] == [0, 2, 2, 0]
    for bad in (3, -4):
        with pytest.raises(InputError, match=f"layer {bad} is out of range; the model has 3"):
            arch.layer_index(bad)
    with pytest.raises(InputError, match="--layer must be an integer"):
        arch.layer_index(True, "--layer")  # type: ignore[arg-type]


def test_study_resolve_layer_checks_the_range(arch: Architecture) -> None:
    """``StudyOptions.resolve_layer`` had no check: an out-of-range layer failed later."""
    assert StudyOptions(layer=-1).resolve_layer(arch, default=0) == 2
    assert StudyOptions().resolve_layer(arch, default=-2) == 1
    with pytest.raises(InputError, match="--layer 7 is out of range"):
        StudyOptions(layer=7).resolve_layer(arch, default=0)


def test_cli_shows_notices_on_stderr(capsys: pytest.CaptureFixture[str]) -> None:
    show_notices()
    show_notices()  # once per process, not one line per call
    logging.getLogger("backward_lens.gguf_cache").info("converting m.gguf once")
    logging.getLogger("backward_lens.web").info("/api/explain took 0.1 s")  # not a notice
    assert capsys.readouterr().err == "backward-lens: converting m.gguf once\n"


def test_conversion_notice_is_logged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from backward_lens import gguf_cache

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + b"\x00" * 64)
    monkeypatch.setenv(gguf_cache.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.setattr(gguf_cache, "convert_gguf", lambda g, e, d: None)
    with caplog.at_level(logging.INFO, logger="backward_lens"):
        gguf_cache.cached_conversion(gguf, torch.float32)
    (record,) = [r for r in caplog.records if r.name == "backward_lens.gguf_cache"]
    assert record.levelno == logging.INFO and "converting m.gguf once" in record.getMessage()
