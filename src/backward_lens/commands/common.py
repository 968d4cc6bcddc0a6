"""Arguments and helpers shared by several subcommands (the model, shards, the Ray backend).

``parse_layers`` and ``positive_int`` live in :mod:`backward_lens.commands.options` and are
re-exported here.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from typing import Any

from backward_lens import checks
from backward_lens.commands.options import (
    add_config_arguments,
    add_shared,
    config_from_args,
    parse_layers,
    positive_int,
)
from backward_lens.distributed.shards import Shard, resolve_shard
from backward_lens.errors import InputError
from backward_lens.models import BUILTIN_MODELS, DEFAULT_MODEL, LensModel, load_model

__all__ = [
    "ModelOptions",
    "add_model_arguments",
    "add_ray_arguments",
    "add_shard_argument",
    "check_layer_list",
    "check_model_args",
    "model_from_args",
    "parse_layers",
    "positive_int",
    "ray_from_args",
    "shard_from_args",
]


@dataclass
class ModelOptions:
    """Which model to load and where: the options every model-loading command shares.

    Attributes:
        model: a built-in name, Hugging Face hub id, local folder or ``.gguf`` file.
        dtype: the weights' floating-point type.
        device: where the model runs (None: cpu).
        device_map: ``"auto"`` spreads a large model over the devices (None: one device).
    """

    model: str = field(
        default=DEFAULT_MODEL,
        metadata={
            "help": f"built-in name ({', '.join(BUILTIN_MODELS)}), Hugging Face hub id, local "
            "model folder, or .gguf file"
        },
    )
    dtype: str = field(
        default="float32",
        metadata={
            "help": "floating-point type of the weights",
            "choices": ["float32", "bfloat16", "float16", "float64"],
        },
    )
    device: str | None = field(
        default=None,
        metadata={"help": "cpu, cuda, cuda:1 ...", "default_help": "cpu", "metavar": "DEVICE"},
    )
    device_map: str | None = field(
        default=None,
        metadata={
            "help": '"auto" to spread a large model over the devices',
            "default_help": "none",
            "metavar": "MAP",
        },
    )


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--model``, ``--dtype``, ``--device``, ``--device-map`` (:class:`ModelOptions`)."""
    add_config_arguments(parser, ModelOptions)


def check_model_args(args: argparse.Namespace) -> None:
    """Refuse a --device this machine lacks before anything is loaded."""
    checks.device(args.device)


def model_from_args(args: argparse.Namespace) -> LensModel:
    """Load ``--model`` with ``--dtype``/``--device``/``--device-map`` (device checked first)."""
    check_model_args(args)
    o = config_from_args(ModelOptions, args)
    return load_model(o.model, dtype=o.dtype, device=o.device, device_map=o.device_map)


def check_layer_list(layers: list[int] | None, n_layers: int, what: str) -> None:
    """Every index of ``layers`` must exist in a model of ``n_layers`` blocks."""
    if layers is not None:
        checks.layers(what, layers, n_layers)


def add_shard_argument(parser: argparse.ArgumentParser, what: str) -> None:
    """Add ``--shard K/N``: run the K-th of N parts (K from 0); see ``distributed/shards.py``.

    Args:
        parser: the command's parser.
        what: which units part K takes, e.g. ``"the grid points p with p mod N == K"``.
    """
    add_shared(
        parser,
        "--shard",
        f"{what}, written to this part's own file in --out; the summary merges every part "
        "(default: from RANK/WORLD_SIZE or SLURM_ARRAY_TASK_ID/SLURM_ARRAY_TASK_COUNT when set, "
        "else 0/1)",
        default=None,
    )


def shard_from_args(args: argparse.Namespace) -> Shard:
    """The shard of this process: ``--shard``, else the launcher's environment, else 0/1.

    Raises:
        InputError: unreadable, out of range, or conflicting values (one line).
    """
    return resolve_shard(getattr(args, "shard", None))


def add_ray_arguments(parser: argparse.ArgumentParser) -> None:
    """``--workers``, ``--ray-address``, ``--gpus-per-worker``: the optional Ray backend."""
    add_shared(
        parser,
        "--workers",
        "(each loads the model once and pulls batches of records; this process writes the "
        "results): a local Ray cluster, or the one at --ray-address / RAY_ADDRESS. Needs: pip "
        "install 'backward-lens[ray]' (default: compute in this process)",
        type=positive_int,
        default=None,
    )
    add_shared(
        parser,
        "--ray-address",
        "(e.g. ray://head:10001 or auto) (default with --workers: RAY_ADDRESS when set, else a "
        "new local cluster)",
        default=None,
    )
    parser.add_argument(
        "--gpus-per-worker",
        type=float,
        default=0.0,
        metavar="G",
        help="GPUs each Ray worker reserves (0.5: two small models share a GPU; 2 with "
        "--device-map auto: a model spread over two GPUs) (default: 0)",
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
