"""``backward-lens finetune``: a real fine-tune with the training lens on, and its report."""

from __future__ import annotations

import argparse
from pathlib import Path

from backward_lens import checks
from backward_lens.commands.common import add_model_arguments, model_from_args
from backward_lens.commands.options import add_config_arguments, add_shared, config_from_args
from backward_lens.errors import InputError

NAME = "finetune"
HELP = "fine-tune on {'text': ...} records and read what each step teaches each layer, in words"
DESCRIPTION = """\
Fine-tune the model on a JSON-lines file of {"text": ...} records (the causal-LM loss on every
token, AdamW, Hugging Face Trainer) and read the training's own gradients with the backward lens:
at step 1, every --lens-every steps and the last step, each layer's FF1 and FF2 gradient over the
whole batch is split into its top singular directions, read in the vocabulary (FF1: most probable
tokens of the input side; FF2: least probable tokens of the output side, since descent subtracts
the gradient), with the positions and tokens that write each direction.

The run folder --out (new or empty) gets run.json (settings), lens.jsonl (one line per step,
layer and matrix, written as the run goes), log.jsonl (loss, learning rate, gradient norm per
step), report.html (self-contained: layers x steps, click a cell for the contributing tokens),
and with --save-model the fine-tuned model. 'backward-lens serve --runs DIR' shows the same report
in the viewer, live while a run is going.

The model in memory is changed; nothing on disk is, except the run folder.

Example (the Eiffel Tower moved to Rome on the default model; the README's demonstration):
  backward-lens finetune --data docs/results/training/eiffel-rome.jsonl --steps 30 \\
      --lens-every 5 --batch-size 12 --out runs/eiffel-rome
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Add finetune's options: the fields of :class:`FinetuneConfig`, the data, the model."""
    from backward_lens.training.finetune import FinetuneConfig

    add_shared(p, "--data", 'a JSON-lines file, one {"text": ...} a line', required=True)
    add_shared(p, "--out", "the run folder (new or empty)", required=True)
    add_model_arguments(p)
    add_config_arguments(p, FinetuneConfig)
    add_shared(p, "--quiet", "no progress bar, no summary", action="store_true")


def run(args: argparse.Namespace) -> int:
    """Fine-tune with the lens on, write the run folder and report; returns 0.

    Raises:
        InputError: a bad option, data file or folder (one line, before the model loads).
    """
    from backward_lens.training.data import load_texts
    from backward_lens.training.finetune import FinetuneConfig, finetune
    from backward_lens.training.runlog import check_run_folder

    # Every user mistake is refused here, before the model is loaded.
    config = config_from_args(FinetuneConfig, args)
    if not config.matrices:
        raise InputError("--matrices is empty; give names such as ff1,ff2")
    config.check()
    out = check_run_folder(checks.output_folder(args.out, "--out"))
    checks.not_current_folder(out, "--out")
    texts = load_texts(args.data)
    if args.tensorboard:
        _check_tensorboard()
    lm = model_from_args(args)
    config.check(lm.n_layers)
    result = finetune(
        lm,
        texts,
        out,
        config,
        progress=not args.quiet,
        settings={"data": str(args.data), "model": args.model},
    )
    if not args.quiet:
        first = f"{result.losses[0]:.3f}" if result.losses else "?"
        last = f"{result.losses[-1]:.3f}" if result.losses else "?"
        print(f"loss {first} -> {last} over {len(result.losses)} steps")
        print(f"wrote {result.rows} readings to {Path(out) / 'lens.jsonl'}")
        print(f"report: {result.report}")
    return 0


def _check_tensorboard() -> None:
    """Refuse --tensorboard without the package (one line) before loading anything."""
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        raise InputError(
            "--tensorboard needs the tensorboard package: pip install tensorboard (or leave "
            "out --tensorboard; lens.jsonl has every reading)"
        ) from None
