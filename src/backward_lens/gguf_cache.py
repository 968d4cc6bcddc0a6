"""The GGUF conversion cache: each ``.gguf`` model dequantised once into a plain HF folder.

GGUF files are dequantised by transformers, which takes 15-50 s on two cores, so the result is
converted once into an on-disk cache (safetensors + config + tokenizer + a manifest written last
with sizes and CRC-32 checksums). A cache entry without a valid manifest, or whose files do not
match it, is partial or corrupt and is rebuilt, never used. A conversion writes into a temporary
folder that records its owner (pid, host) and is renamed into place when complete; the temporary
folders of conversions that died are removed by the next one.

The cache root (:func:`cache_dir`) also holds the editors' key statistics (``editing/stats.py``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import zlib
from pathlib import Path

import torch

from backward_lens.errors import CacheError, ModelNotFoundError

log = logging.getLogger(__name__)

CACHE_ENV = "BACKWARD_LENS_CACHE"
_MANIFEST = "manifest.json"
_CACHE_FORMAT = 1


def cache_dir() -> Path:
    """Root of the conversion cache: ``$BACKWARD_LENS_CACHE`` or ``~/.cache/backward_lens``."""
    root = os.environ.get(CACHE_ENV) or str(Path.home() / ".cache" / "backward_lens")
    return Path(root)


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
    """The cache folder of ``gguf`` converted to ``dtype``: ``models/STEM-KEY-DTYPE``."""
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
    """True for a conversion temporary whose owner is gone.

    Gone: its pid is dead on this host, or it has no readable owner file (or one from another
    host) and is older than :data:`_ORPHAN_AGE_S`.
    """
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


def cached_conversion(gguf: Path, dtype: torch.dtype) -> Path:
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
        log.info("removed an interrupted conversion's folder %s", stale)
    log.info(
        "converting %s once into %s (15-60 s; later loads take about a second)",
        gguf.name,
        entry.parent,
    )
    convert_gguf(gguf, entry, dtype)
    return entry


CACHE_MAX_SHARD_SIZE: int | str = "2GB"
"""The largest weights file the conversion cache writes (bytes, or ``"2GB"`` as transformers
reads it). A model above it is stored as ``model-0000K-of-0000N.safetensors`` plus
``model.safetensors.index.json``, as the hub stores big models, so a 7B model is not one 13 GB
file; a smaller one stays a single ``model.safetensors``. Every file is in the manifest (size and
CRC-32), so a damaged or missing shard makes the entry invalid and it is converted again."""


def convert_gguf(
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
