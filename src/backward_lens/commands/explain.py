"""``backward-lens explain``: the backward lens of one prompt, as a table, JSON and figures."""

from __future__ import annotations

import argparse
from pathlib import Path

from backward_lens import checks
from backward_lens.commands.common import add_model_arguments, check_layer_list, model_from_args
from backward_lens.commands.options import (
    add_json_flag,
    add_shared,
    parse_layers,
    positive_int,
    signature_default,
)
from backward_lens.errors import InputError, OutputPathError
from backward_lens.explain import Explanation, explain
from backward_lens.io import atomic_write_many
from backward_lens.tokens import MultiTokenPolicy

NAME = "explain"
HELP = "read one prompt's gradients in words (FF1 imprint, FF2 shift), per layer and token"
DESCRIPTION = """\
One forward and one backward pass with the paper's loss (NLL of the target token at the last
position), then the logit lens of every layer's FF1 inputs x_i (read by their most probable
tokens) and FF2 VJPs delta_i (read by their least probable tokens: gradient descent subtracts
them, so these are the tokens the update pushes the output towards).

Example (the built-in example on the default model):
  backward-lens explain
  backward-lens explain "The Eiffel Tower is located in the city of" --target " Rome" \\
      --png eiffel.png --html eiffel.html --json eiffel.json
  backward-lens explain --json | jq '.layers[0].ff2.rank'   # the JSON alone on stdout
"""

EXAMPLE_PROMPT = "The Eiffel Tower is located in the city of"
EXAMPLE_TARGET = " Rome"


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add explain's options."""
    p.add_argument(
        "prompt", nargs="?", default=None, help=f"the prompt (default: {EXAMPLE_PROMPT!r})"
    )
    p.add_argument(
        "--target",
        default=None,
        help=f"the new target, one token (default with the example: {EXAMPLE_TARGET!r})",
    )
    add_model_arguments(p)
    top_k = signature_default(explain, "top_k")
    p.add_argument(
        "--top-k",
        type=positive_int,
        default=top_k,
        metavar="N",
        help=f"tokens kept per cell (default: {top_k})",
    )
    p.add_argument(
        "--normalized",
        action="store_true",
        help="normalised logit lens: L2-normalise each vector before projecting (paper App. H)",
    )
    p.add_argument(
        "--layers",
        default=None,
        metavar="LAYERS",
        help="layers to read, e.g. 0,5,20-29 (default: all)",
    )
    p.add_argument(
        "--matrices",
        default=None,
        metavar="A,B",
        help="matrices to capture, e.g. ff1,ff2 (leaves out the gate's rank and memory) "
        "(default: all)",
    )
    group = p.add_mutually_exclusive_group()
    group.add_argument(
        "--first-token",
        action="store_true",
        help="if the target is several tokens, use its first token (the paper's editing code)",
    )
    group.add_argument(
        "--teacher-forced",
        action="store_true",
        help="if the target is several tokens, sum the NLL of all of them (teacher forcing)",
    )
    p.add_argument("--no-space", action="store_true", help="do not prepend a space to the target")
    add_json_flag(p)
    p.add_argument("--png", metavar="FILE", help="write the Fig. 4-style heatmap as PNG")
    p.add_argument("--html", metavar="FILE", help="write a self-contained interactive page")
    add_shared(p, "--quiet", "nothing but errors", action="store_true")


def run(args: argparse.Namespace) -> int:
    """Explain the prompt, print the table (or the JSON) and write the asked files; returns 0.

    Raises:
        InputError: no target, bad layers, a multi-token target without a policy.
        OutputPathError: an output file that cannot be written (nothing is written then).
    """
    prompt, target = args.prompt, args.target
    if prompt is None:
        prompt, target = EXAMPLE_PROMPT, target or EXAMPLE_TARGET
    if target is None:
        raise InputError("give the target with --target, e.g. --target ' Rome'")
    policy: MultiTokenPolicy = (
        "first" if args.first_token else "teacher_forced" if args.teacher_forced else "error"
    )
    layers = parse_layers(args.layers)
    json_file = None if args.json == "-" else args.json
    outputs = checks.output_files({"--json": json_file, "--png": args.png, "--html": args.html})
    lm = model_from_args(args)
    check_layer_list(layers, lm.n_layers, "--layers")
    expl = explain(
        lm,
        prompt,
        target,
        top_k=args.top_k,
        normalized=args.normalized,
        layers=layers,
        multi_token=policy,
        add_space=not args.no_space,
        matrices=None if args.matrices is None else [m.strip() for m in args.matrices.split(",")],
    )
    # Render everything, then write all files in one step: a failure leaves none of them.
    files: dict[Path, bytes] = {}
    if "--json" in outputs:
        files[outputs["--json"]] = expl.to_json().encode("utf-8")
    if "--png" in outputs:
        files[outputs["--png"]] = _png_bytes(expl)
    if "--html" in outputs:
        from backward_lens.web.render import render_explanation_html

        files[outputs["--html"]] = render_explanation_html(expl.to_dict()).encode("utf-8")
    try:
        atomic_write_many(files)
    except OSError as exc:
        raise OutputPathError(
            f"cannot write {exc.filename or 'the outputs'} ({exc.strerror or exc}); nothing was "
            "written"
        ) from None
    if args.json == "-":  # the JSON alone on stdout, for a pipe
        print(expl.to_json())
    elif not args.quiet:
        print(format_explanation(expl))
        for flag, path in (("json", json_file), ("png", args.png), ("html", args.html)):
            if path:
                print(f"wrote {flag}: {path}")
    return 0


def _png_bytes(expl: Explanation) -> bytes:
    """The Fig. 4-style heatmap as PNG bytes (nothing written)."""
    import io

    import matplotlib.pyplot as plt

    from backward_lens.plots import figure_explanation

    fig = figure_explanation(expl)
    try:
        buf = io.BytesIO()
        fig.savefig(buf, dpi=110, format="png")
        return buf.getvalue()
    finally:
        plt.close(fig)


def _cell(token: str, width: int) -> str:
    """``token`` on one line, cut or padded to ``width`` characters."""
    token = token.replace("\n", "\\n")
    if len(token) > width:
        token = token[: width - 1] + "…"
    return token.ljust(width)


def format_explanation(expl: Explanation, width: int = 10) -> str:
    """The paper's Fig. 4 as text: one row per layer (top layer first), one column per token."""
    t = expl.target
    lines = [
        f"model {expl.model}: {expl.prompt!r} -> target {t.token!r} (id {t.token_id})",
        f"prediction {expl.prediction.token!r} (p={expl.prediction.prob:.3f}); "
        f"P(target)={expl.target_prob:.2e}; loss {expl.loss:.4f}; "
        f"lens: {'normalised' if expl.normalized else 'raw'}",
    ]
    if len(t.all_token_ids) > 1:
        lines.append(f"note: the target is {len(t.all_token_ids)} tokens; ranks use the first")
    header = "layer rank | " + "".join(_cell(tok, width) for tok in expl.tokens)
    for name, side, what in (
        ("ff1", "top", "FF1 imprint: most probable token of x_i"),
        ("ff2", "bottom", "FF2 shift: least probable token of δ_i (target rank at last token)"),
    ):
        lines += ["", what, header, "-" * len(header)]
        for layer_reading in reversed(expl.layers):
            mr = getattr(layer_reading, name)
            cells = "".join(_cell(p_.__dict__[side][0], width) for p_ in mr.positions)
            extra = f"  [{mr.positions[-1].target_rank}]" if name == "ff2" else ""
            lines.append(f"{layer_reading.layer:>5} {mr.rank:>4} | {cells}{extra}")
    v = expl.vocab_size
    lines.append(f"\n(target rank: 0 = most probable, {v - 1} = least probable of {v} tokens)")
    return "\n".join(lines)
