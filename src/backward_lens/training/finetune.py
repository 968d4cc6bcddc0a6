"""A real fine-tune with the Hugging Face Trainer and the training lens: ``backward-lens finetune``.

The whole model (or the blocks given in ``train_layers``) is trained on ``{"text": ...}`` records
with the causal-LM loss; :class:`~backward_lens.training.callback.BackwardLensCallback` reads step
1, every ``lens_every``-th step and the last one into the run folder; at the end the folder gets a
self-contained ``report.html``. The defaults suit a 135M-parameter model on a laptop CPU.
"""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from backward_lens import checks
from backward_lens.capture import resolve_layers
from backward_lens.errors import InputError
from backward_lens.io import atomic_write_text
from backward_lens.models import LensModel, quiet_transformers
from backward_lens.training.callback import BackwardLensCallback
from backward_lens.training.data import Collator, TokenDataset, tokenize
from backward_lens.training.report import render_run_html
from backward_lens.training.runlog import REPORT_FILE, check_run_folder, read_jsonl


@dataclass
class FinetuneConfig:
    """Settings of one fine-tune (the command's options).

    Attributes:
        steps: optimizer steps.
        lens_every: read step 1, every ``lens_every``-th step and the last.
        lr: AdamW learning rate (constant schedule unless ``schedule`` says otherwise).
        batch_size: sequences per micro-batch; ``grad_accum``: micro-batches per step.
        max_length: tokens kept per text.
        seed: shuffling and initialisation seed.
        train_layers: blocks whose parameters train (None: every parameter of the model).
        layers, matrices: what the lens reads (default every layer's ``ff1`` and ``ff2``).
        directions, top_tokens, contributors: size of each reading.
        max_grad_norm: gradient clipping (0: none); the lens reads the unclipped gradient.
        weight_decay, warmup_steps, schedule: the optimizer's other settings.
        tensorboard: also log to ``out/tensorboard`` (needs the package).
        save_model: save the fine-tuned model and tokenizer to ``out/model``.
    """

    # The metadata makes the command-line options (backward_lens.commands.options).
    steps: int = field(metadata={"help": "optimizer steps", "min": 1})
    lens_every: int = field(
        default=10, metadata={"help": "read every K steps", "metavar": "K", "min": 1}
    )
    lr: float = field(default=1e-4, metadata={"help": "AdamW learning rate"})
    batch_size: int = field(default=4, metadata={"help": "texts per micro-batch", "min": 1})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per step", "min": 1})
    max_length: int = field(default=64, metadata={"help": "tokens per text", "min": 1})
    seed: int = field(default=0, metadata={"help": "of the shuffling and initialisation"})
    train_layers: list[int] | None = field(
        default=None,
        metadata={
            "help": "train only these blocks, e.g. 20-29",
            "parse": "layers",
            "default_help": "all",
        },
    )
    layers: list[int] | None = field(
        default=None,
        metadata={"help": "layers the lens reads", "parse": "layers", "default_help": "all"},
    )
    matrices: list[str] = field(
        default_factory=lambda: ["ff1", "ff2"],
        metadata={"help": "matrices read: ff1,ff2 (+gate,q,k,v,o)"},
    )
    directions: int = field(default=3, metadata={"help": "directions per matrix", "min": 1})
    top_tokens: int = field(
        default=5, metadata={"help": "words per direction", "flag": "--top-k", "min": 1}
    )
    contributors: int = 5
    max_grad_norm: float = field(default=1.0, metadata={"help": "gradient clipping, 0 for none"})
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = field(
        default="constant",
        metadata={"help": "learning-rate schedule", "choices": ["constant", "linear", "cosine"]},
    )
    tensorboard: bool = field(default=False, metadata={"help": "also log to DIR/tensorboard"})
    save_model: bool = field(default=False, metadata={"help": "save the model to DIR/model"})

    def check(self, n_layers: int | None = None) -> None:
        """Refuse values that cannot work, before any work.

        Args:
            n_layers: the model's layer count, to check ``train_layers`` and ``layers`` (None:
                not yet known, not checked).

        Raises:
            InputError: (one line) a size below its minimum, a learning rate, gradient norm or
                weight decay out of range, an unknown schedule, or a layer the model lacks.
        """
        for name in ("steps", "lens_every", "batch_size", "grad_accum", "directions"):
            checks.integer(name.replace("_", "-"), getattr(self, name), lo=1)
        for name in ("top_tokens", "contributors"):
            checks.integer(name.replace("_", "-"), getattr(self, name), lo=1)
        checks.integer("max-length", self.max_length, lo=2)
        checks.integer("warmup-steps", self.warmup_steps, lo=0)
        checks.number("lr", self.lr, lo=0, hi=checks.MAX_LR)
        checks.number("max-grad-norm", self.max_grad_norm, lo=0, lo_open=False)
        checks.number("weight-decay", self.weight_decay, lo=0, lo_open=False)
        if self.schedule not in ("constant", "linear", "cosine"):
            raise InputError(f"schedule must be constant, linear or cosine, not {self.schedule!r}")
        if n_layers is not None:
            for what, value in (("train-layers", self.train_layers), ("layers", self.layers)):
                if value is not None:
                    checks.layers(what, value, n_layers)


@dataclass
class FinetuneResult:
    """What a fine-tune produced.

    Attributes:
        out: the run folder; ``report``: its HTML report.
        losses: the training loss of every step, in order.
        rows: lines written to ``lens.jsonl``.
    """

    out: Path
    report: Path
    losses: list[float]
    rows: int


def freeze_outside(
    model: torch.nn.Module, lm: LensModel, train_layers: Sequence[int] | None
) -> None:
    """Let every parameter train, or only those of the blocks ``train_layers``."""
    if train_layers is None:
        model.requires_grad_(True)
        return
    model.requires_grad_(False)
    for layer in resolve_layers(train_layers, lm.n_layers):
        lm.arch.layers[layer].requires_grad_(True)


def finetune(
    lm: LensModel,
    texts: list[str],
    out: str | Path,
    config: FinetuneConfig,
    *,
    progress: bool = True,
    settings: dict[str, Any] | None = None,
) -> FinetuneResult:
    """Fine-tune ``lm`` on ``texts`` with the lens on; write the run folder and its report.

    The model's weights are changed (that is the point); its ``requires_grad`` flags and
    train/eval mode are restored afterwards, and every hook is removed, whatever happens. A run
    stopped with Ctrl-C keeps every line written so far and gets the report of those steps.

    Raises:
        InputError, OutputPathError, DataError: bad settings, a non-empty run folder, texts
            that cannot be trained on; all checked before training starts.
    """
    config.check(lm.n_layers)
    out = check_run_folder(out)
    sequences = tokenize(lm.tokenizer, texts, config.max_length)
    model = lm.model
    flags = [(p, p.requires_grad) for p in model.parameters()]
    modes = [(m, m.training) for m in model.modules()]
    losses: list[float] = []
    try:
        freeze_outside(model, lm, config.train_layers)
        run_settings = {
            "kind": "finetune",
            "config": asdict(config),
            "texts": len(texts),
            "tokens": sum(len(s) for s in sequences),
            **(settings or {}),
        }
        with (
            tempfile.TemporaryDirectory(prefix="backward-lens-trainer-") as scratch,
            BackwardLensCallback(
                model,
                lm.tokenizer,
                out,
                every=config.lens_every,
                layers=config.layers,
                matrices=config.matrices,
                directions=config.directions,
                top_tokens=config.top_tokens,
                contributors=config.contributors,
                tensorboard=config.tensorboard,
                settings=run_settings,
            ) as lens,
        ):
            args = TrainingArguments(
                output_dir=scratch,
                max_steps=config.steps,
                per_device_train_batch_size=config.batch_size,
                gradient_accumulation_steps=config.grad_accum,
                learning_rate=config.lr,
                weight_decay=config.weight_decay,
                warmup_steps=config.warmup_steps,
                lr_scheduler_type=config.schedule,
                max_grad_norm=config.max_grad_norm,
                logging_steps=1,
                save_strategy="no",
                report_to="none",
                disable_tqdm=True,
                seed=config.seed,
                data_seed=config.seed,
                use_cpu=lm.device.type == "cpu",
                remove_unused_columns=False,
                dataloader_num_workers=0,
            )
            bar = LossBar(config.steps, enabled=progress)
            with quiet_transformers():
                trainer = Trainer(
                    model=model,
                    args=args,
                    train_dataset=TokenDataset(sequences),
                    data_collator=Collator.for_tokenizer(lm.tokenizer),
                    callbacks=[lens, bar],
                )
                trainer.remove_callback(PrinterCallback)
                trainer.remove_callback(ProgressCallback)
                try:
                    trainer.train()
                except KeyboardInterrupt:
                    # Keep what was read so far viewable: the report of the steps done.
                    atomic_write_text(out / REPORT_FILE, render_run_html(out))
                    raise
                finally:
                    bar.close()
            losses = bar.losses
        rows = sum(1 for _ in read_jsonl(out / "lens.jsonl"))
        report = atomic_write_text(out / REPORT_FILE, render_run_html(out))
        if config.save_model:
            model.save_pretrained(out / "model")  # type: ignore[operator]
            lm.tokenizer.save_pretrained(out / "model")
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)
        for m, training in modes:
            m.training = training
    return FinetuneResult(out, report, losses, rows)


class LossBar(TrainerCallback):
    """A progress bar with the loss (tqdm on stderr); keeps every step's loss in ``losses``.

    Args:
        total: the number of optimizer steps (the bar's length).
        enabled: draw the bar; when False only the losses are kept.
    """

    def __init__(self, total: int, *, enabled: bool = True) -> None:
        self.losses: list[float] = []
        self.bar: Any = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, unit="step", desc="fine-tune", file=sys.stderr)

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
        """Keep a logged ``loss`` and show it next to the bar."""
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))
            if self.bar is not None:
                self.bar.set_postfix(loss=f"{float(logs['loss']):.3f}")

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        """Advance the bar by one optimizer step (its loss follows in :meth:`on_log`)."""
        if self.bar is not None:
            self.bar.update(1)  # the loss of this step follows in on_log

    def close(self) -> None:
        """Close the bar (idempotent)."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
