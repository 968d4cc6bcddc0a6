"""Arguments and helpers shared by several subcommands."""

from __future__ import annotations

import argparse

from backward_lens import checks
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
