"""Markdown tables of a training-lens run folder, as quoted in README ("Training lens").

    .venv/bin/python docs/results/training/summarize.py RUN_FOLDER [--word " Rome"] [--layers 20-29]

Prints (1) the loss at each read step, (2) for FF2 and FF1, per layer (top first) and read step,
the first direction's two first words and the gradient's norm, and (3) with --word, where that
word appears: "d2:1 30%" = in direction 2's words at place 1, a direction holding 30% of the
gradient's energy.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from backward_lens.training.runlog import read_jsonl


def rows_of(folder: Path, name: str) -> list[dict]:
    return list(read_jsonl(folder / name))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("run", type=Path)
    p.add_argument("--word", default=None)
    p.add_argument("--layers", default="20-29")
    p.add_argument("--matrices", default="ff2,ff1")
    a = p.parse_args()
    lo, hi = (int(v) for v in a.layers.split("-"))
    rows = rows_of(a.run, "lens.jsonl")
    logs = rows_of(a.run, "log.jsonl")
    loss = {r["step"]: r["loss"] for r in logs if "loss" in r}
    steps = sorted({r["step"] for r in rows})
    cell = {(r["matrix"], r["layer"], r["step"]): r for r in rows}
    head = "| layer | " + " | ".join(f"step {s}" for s in steps) + " |"
    rule = "|---|" + "---|" * len(steps)
    print("| | " + " | ".join(f"step {s}" for s in steps) + " |\n" + rule)
    print("| loss | " + " | ".join(f"{loss.get(s, float('nan')):.2f}" for s in steps) + " |\n")
    for m in a.matrices.split(","):
        print(f"{m}: first direction's words (norm)\n\n{head}\n{rule}")
        for layer in range(hi, lo - 1, -1):
            cells = []
            for s in steps:
                r = cell.get((m, layer, s))
                if r is None or not r["directions"]:
                    cells.append("")
                    continue
                words = " · ".join(w.replace("|", "\\|") for w in r["directions"][0]["words"][:2])
                cells.append(f"`{words}` ({r['norm']:.2f})")
            print(f"| {layer} | " + " | ".join(cells) + " |")
        print()
    if a.word:
        print(f"where {a.word!r} is read in ff2 (direction:place, energy share)\n\n{head}\n{rule}")
        for layer in range(hi, lo - 1, -1):
            cells = []
            for s in steps:
                r = cell.get(("ff2", layer, s))
                hits = [
                    f"d{j + 1}:{d['words'].index(a.word) + 1} {d['share']:.0%}"
                    for j, d in enumerate(r["directions"] if r else [])
                    if a.word in d["words"]
                ]
                cells.append(", ".join(hits) or "–")
            print(f"| {layer} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
