"""Arguments and helpers shared by several subcommands."""

from __future__ import annotations

import argparse
import os
from typing import Any

from backward_lens import checks
from backward_lens.distributed.shards import Shard, resolve_shard
from backward_lens.errors import InputError
from backward_lens.models import BUILTIN_MODELS, DEFAULT_MODEL, LensModel, load_model


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model",
        default=DEFAULT_MODEL,
        metavar="SPEC",
        help=(
            f"built-in name ({', '.join(BUILTIN_MODELS)}), Hugging Face hub id, local model "
            f"folder, or .gguf file (default: {DEFAULT_MODEL})"
        ),
    )
    parser.add_argument(
        "--dtype", default="float32", choices=["float32", "bfloat16", "float16", "float64"]
    )
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cpu)")
    parser.add_argument(
        "--device-map", default=None, help='"auto" to spread a large model over the devices'
    )


def check_model_args(args: argparse.Namespace) -> None:
    """Refuse a --device this machine lacks before anything is loaded."""
    checks.device(args.device)


def model_from_args(args: argparse.Namespace) -> LensModel:
    """Load ``--model`` with ``--dtype``/``--device``/``--device-map`` (device checked first)."""
    check_model_args(args)
    return load_model(args.model, dtype=args.dtype, device=args.device, device_map=args.device_map)


def parse_layers(text: str | None) -> list[int] | None:
    """``"0,5,10-12,-1"`` -> [0, 5, 10, 11, 12, -1]; None or "all" -> None (every layer)."""
    if text is None or text.strip().lower() in ("", "all"):
        return None
    layers: list[int] = []
    for piece in text.split(","):
        piece = piece.strip()
        try:
            if "-" in piece[1:]:
                lo, hi = piece[0] + piece[1:].split("-", 1)[0], piece[1:].split("-", 1)[1]
                first, last = int(lo), int(hi)
            else:
                first = last = int(piece)
        except ValueError:
            raise InputError(
                f"cannot read layers {text!r}; use indices and ranges such as 0,5,10-12,-1"
            ) from None
        if last < first:
            raise InputError(
                f"the layer range {piece} in {text!r} is reversed; write {last}-{first}"
            )
        layers.extend(range(first, last + 1))
    return layers


def check_layer_list(layers: list[int] | None, n_layers: int, what: str) -> None:
    """Every index of ``layers`` must exist in a model of ``n_layers`` blocks."""
    if layers is not None:
        checks.layers(what, layers, n_layers)


def positive_int(text: str) -> int:
    """argparse type: an integer of 1 or more."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def add_shard_argument(parser: argparse.ArgumentParser, what: str = "records") -> None:
    """``--shard K/N``: run the K-th of N parts (K from 0); see ``distributed/shards.py``."""
    parser.add_argument(
        "--shard",
        default=None,
        metavar="K/N",
        help=f"run only part K of N (K from 0: {what} i with i mod N == K) and write this "
        "part's own results file in --out; the summary merges every part. Default: from "
        "RANK/WORLD_SIZE or SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT when set, else 0/1",
    )


def shard_from_args(args: argparse.Namespace) -> Shard:
    """The shard of this process: ``--shard``, else the launcher's environment, else 0/1.

    Raises:
        InputError: unreadable, out of range, or conflicting values (one line).
    """
    return resolve_shard(getattr(args, "shard", None))


def add_ray_arguments(parser: argparse.ArgumentParser) -> None:
    """``--workers``, ``--ray-address``, ``--gpus-per-worker``: the optional Ray backend."""
    parser.add_argument(
        "--workers",
        type=positive_int,
        default=None,
        metavar="N",
        help="compute on N Ray workers (each loads the model once and pulls batches of "
        "records; this process writes the results): a local Ray cluster, or the one at "
        "--ray-address / RAY_ADDRESS. Needs: pip install 'backward-lens[ray]'",
    )
    parser.add_argument(
        "--ray-address",
        default=None,
        metavar="ADDR",
        help="use the existing Ray cluster at ADDR (e.g. ray://head:10001 or auto); default "
        "with --workers: RAY_ADDRESS when set, else a new local cluster",
    )
    parser.add_argument(
        "--gpus-per-worker",
        type=float,
        default=0.0,
        metavar="G",
        help="GPUs each Ray worker reserves (0.5: two small models share a GPU; 2 with "
        "--device-map auto: a model spread over two GPUs) (0)",
    )


def ray_from_args(args: argparse.Namespace) -> tuple[Any, Any] | None:
    """(ModelSpec, Cluster) when ``--workers`` or ``--ray-address`` asks for Ray, else None.

    Raises:
        InputError: Ray is not installed (one line saying how to install it), or a bad value.
    """
    if getattr(args, "workers", None) is None and getattr(args, "ray_address", None) is None:
        if getattr(args, "gpus_per_worker", 0.0):
            raise InputError("--gpus-per-worker needs --workers N (or --ray-address)")
        return None
    from backward_lens.distributed.ray_backend import Cluster, ModelSpec, require_ray

    require_ray()
    cluster = Cluster(args.workers, args.ray_address, args.gpus_per_worker)
    spec = ModelSpec(args.model, args.dtype, args.device, args.device_map, os.getcwd())
    return spec, cluster
