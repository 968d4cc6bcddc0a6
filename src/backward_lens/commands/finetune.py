"""``backward-lens finetune``: a real fine-tune with the training lens on, and its report."""

from __future__ import annotations

import argparse
from pathlib import Path

from backward_lens import checks
from backward_lens.commands.common import (
    add_model_arguments,
    model_from_args,
    parse_layers,
    positive_int,
)
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
    p.add_argument("--data", required=True, metavar="FILE.jsonl", help='one {"text": ...} a line')
    p.add_argument("--steps", required=True, type=positive_int, help="optimizer steps")
    p.add_argument(
        "--lens-every", type=positive_int, default=10, metavar="K", help="read every K steps (10)"
    )
    p.add_argument("--out", required=True, metavar="DIR", help="run folder (new or empty)")
    add_model_arguments(p)
    p.add_argument("--lr", type=float, default=1e-4, help="AdamW learning rate (1e-4)")
    p.add_argument(
        "--schedule", default="constant", choices=["constant", "linear", "cosine"], help="lr"
    )
    p.add_argument("--batch-size", type=positive_int, default=4, help="texts per micro-batch (4)")
    p.add_argument("--grad-accum", type=positive_int, default=1, help="micro-batches per step (1)")
    p.add_argument("--max-length", type=positive_int, default=64, help="tokens per text (64)")
    p.add_argument("--seed", type=int, default=0, help="shuffling seed (0)")
    p.add_argument(
        "--max-grad-norm", type=float, default=1.0, help="gradient clipping, 0 for none (1.0)"
    )
    p.add_argument(
        "--train-layers", default=None, help="train only these blocks, e.g. 20-29 (default all)"
    )
    p.add_argument("--layers", default=None, help="layers the lens reads (default all)")
    p.add_argument("--matrices", default="ff1,ff2", help="matrices read: ff1,ff2 (+gate,q,k,v,o)")
    p.add_argument("--directions", type=positive_int, default=3, help="directions per matrix (3)")
    p.add_argument("--top-k", type=positive_int, default=5, help="words per direction (5)")
    p.add_argument("--tensorboard", action="store_true", help="also log to DIR/tensorboard")
    p.add_argument("--save-model", action="store_true", help="save the model to DIR/model")
    p.add_argument("--quiet", action="store_true", help="no progress bar, no summary")


def run(args: argparse.Namespace) -> int:
    from backward_lens.training.data import load_texts
    from backward_lens.training.finetune import FinetuneConfig, finetune
    from backward_lens.training.runlog import check_run_folder

    # Every user mistake is refused here, before the model is loaded.
    matrices = [m.strip() for m in args.matrices.split(",") if m.strip()]
    if not matrices:
        raise InputError("--matrices is empty; give names such as ff1,ff2")
    config = FinetuneConfig(
        steps=args.steps,
        lens_every=args.lens_every,
        lr=args.lr,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        max_length=args.max_length,
        seed=args.seed,
        train_layers=parse_layers(args.train_layers),
        layers=parse_layers(args.layers),
        matrices=matrices,
        directions=args.directions,
        top_tokens=args.top_k,
        max_grad_norm=args.max_grad_norm,
        schedule=args.schedule,
        tensorboard=args.tensorboard,
        save_model=args.save_model,
    )
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
