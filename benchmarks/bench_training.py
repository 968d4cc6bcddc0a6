"""Training-lens overhead, as ratios measured in one run (issue 13). Not a test: asserts nothing.

    .venv/bin/python benchmarks/bench_training.py [--steps 20] [--batch-size 4] [--seq 64]

The default model (SmolLM2-135M) is fine-tuned with the Hugging Face Trainer (AdamW, float32,
CPU unless --device) on ordinary text, three times from the same weights: without the lens, with
``BackwardLensCallback`` reading every 10th step, and reading every step (all 30 layers, FF1 and
FF2, 3 directions). Each step's wall time is measured from ``on_step_begin`` to ``on_step_end``
(the lens's own ``on_step_end``, which reads the step, included). Steps 2 to steps+1 are timed:
the first (warm-up) and the last step are left out in every setting.

Reported: median and mean step time per setting and the ratio of means to the run without the
lens (the mean counts the read steps once per K steps; the median of "every 10" is a step that
is not read); the time of one reading (factors -> directions -> lens); and the memory of the
kept factors of one read step next to the model's parameters and AdamW state.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from backward_lens.models import load_model
from backward_lens.training import BackwardLensCallback
from backward_lens.training.data import Collator, TokenDataset

DATA = Path(__file__).resolve().parents[1] / "docs" / "results" / "training" / "ordinary.jsonl"


class StepClock(TrainerCallback):
    """Wall time of each optimizer step (two instances: one first, one last in the list).

    Args:
        times: where the ``end`` instance appends each step's seconds.
        starts: where the first instance appends each step's start (``perf_counter``).
        end: True for the instance placed last (it stops the clock), False for the first.
    """

    def __init__(self, times: list[float], starts: list[float], end: bool) -> None:
        self.times, self.starts, self.end = times, starts, end

    def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        """Start the clock (first instance only)."""
        if not self.end:
            self.starts.append(time.perf_counter())

    def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        """Stop the clock after every other callback's ``on_step_end`` (last instance only)."""
        if self.end:
            self.times.append(time.perf_counter() - self.starts[-1])


def sequences(tokenizer: Any, n: int, length: int) -> list[list[int]]:
    """``n`` sequences of exactly ``length`` tokens cut from the ordinary-text file, repeated."""
    text = " ".join(line for line in DATA.read_text().splitlines())
    ids = tokenizer(text)["input_ids"]
    while len(ids) < n * length:
        ids = ids + ids
    return [ids[i * length : (i + 1) * length] for i in range(n)]


def run(
    lm: Any, state: dict[str, torch.Tensor], every: int | None, a: argparse.Namespace
) -> dict[str, Any]:
    """Fine-tune from ``state`` for ``a.steps + 2`` steps, reading every ``every``-th step.

    Args:
        lm: the model (its weights are reset to ``state`` first).
        state: the initial weights, the same for every setting.
        every: the lens's reading period, or None for no lens.
        a: the parsed command line.

    Returns:
        ``median`` and ``mean`` step seconds of steps 2 to ``steps + 1``, ``nbytes`` (the largest
        read step's kept factors) and ``read_s`` (median seconds of one reading, 0 without lens).
    """
    lm.model.load_state_dict(state)
    lm.model.requires_grad_(True)
    times: list[float] = []
    starts: list[float] = []
    info: dict[str, Any] = {"nbytes": 0, "read_s": []}
    callbacks: list[Any] = [StepClock(times, starts, end=False)]
    lens = None
    with tempfile.TemporaryDirectory() as scratch:
        if every is not None:
            lens = BackwardLensCallback(lm.model, lm.tokenizer, Path(scratch) / "run", every=every)
            read = lens.lens.read

            def timed_read(rec: Any, step: int) -> Any:
                info["nbytes"] = max(info["nbytes"], rec.nbytes())
                t = time.perf_counter()
                out = read(rec, step)
                info["read_s"].append(time.perf_counter() - t)
                return out

            lens.lens.read = timed_read  # type: ignore[method-assign]
            callbacks.append(lens)
        callbacks.append(StepClock(times, starts, end=True))
        args = TrainingArguments(
            output_dir=scratch,
            max_steps=a.steps + 2,
            per_device_train_batch_size=a.batch_size,
            learning_rate=1e-5,
            lr_scheduler_type="constant",
            report_to="none",
            save_strategy="no",
            disable_tqdm=True,
            use_cpu=lm.device.type == "cpu",
            remove_unused_columns=False,
            logging_steps=10**6,
            seed=0,
        )
        data = TokenDataset(sequences(lm.tokenizer, a.batch_size * 4, a.seq))
        trainer = Trainer(
            model=lm.model,
            args=args,
            train_dataset=data,
            data_collator=Collator.for_tokenizer(lm.tokenizer),
            callbacks=callbacks,
        )
        try:
            trainer.train()
        finally:
            if lens is not None:
                lens.close()
    steps = times[1:-1]  # steps 2..steps+1: not the first (warm-up) nor the last (read)
    return {
        "median": statistics.median(steps),
        "mean": statistics.fmean(steps),
        "nbytes": info["nbytes"],
        "read_s": statistics.median(info["read_s"]) if info["read_s"] else 0.0,
    }


def main() -> None:
    """Parse the command line, run the three settings and print their ratios and memory."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--device", default=None)
    p.add_argument("--steps", type=int, default=20, help="timed steps per setting (20)")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seq", type=int, default=64, help="tokens per sequence (64)")
    a = p.parse_args()
    lm = load_model(a.model, device=a.device)
    state = {k: v.detach().clone() for k, v in lm.model.state_dict().items()}
    n_params = sum(p.numel() for p in lm.model.parameters())
    print(
        f"model {lm.name} ({n_params / 1e6:.0f}M parameters, {lm.n_layers} layers), "
        f"batch {a.batch_size} x {a.seq} tokens, {a.steps} timed steps (2 to {a.steps + 1}), "
        f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.2f}"
    )
    base = run(lm, state, None, a)
    results = {"no lens": base}
    # The lens reads step 1, every K-th and the last; the timed window 2..steps+1 holds
    # exactly steps / K read steps (the first and the last step are left out of every setting).
    for every in (10, 1):
        results[f"lens every {every}"] = run(lm, state, every, a)
    print(f"{'setting':<16} {'median s':>9} {'mean s':>9} {'mean ratio':>11}")
    for name, r in results.items():
        print(
            f"{name:<16} {r['median']:>9.3f} {r['mean']:>9.3f} {r['mean'] / base['mean']:>10.2f}x"
        )
    one = results["lens every 1"]
    adam = 3 * n_params * 4  # parameters + two AdamW moments, float32
    print(
        f"one reading (60 matrices: factors -> 3 directions -> lens): {one['read_s']:.2f} s; "
        f"kept factors of one read step: {one['nbytes'] / 2**20:.0f} MiB "
        f"({one['nbytes'] / adam:.1%} of parameters + AdamW state, {adam / 2**20:.0f} MiB)"
    )
    print(f"load average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
