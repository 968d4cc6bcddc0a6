"""Figs. 19-21: lens ranks of the model's own original answer (and of the target).

They are read in the lens of the last token's FF2 VJP delta_n and FF1 input x_n, split by whether
the model answered correctly.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from backward_lens.capture import Capture
from backward_lens.models import LensModel
from backward_lens.study.base import Aggregate, Experiment, Item, StudyOptions, layer_axis
from backward_lens.study.figures import pyplot
from backward_lens.tokens import encode_request

QUANTITIES = {
    "answer_in_delta": "original answer in LL(δ_n) of FF2 (Fig. 19)",
    "answer_in_x": "original answer in LL(x_n) of FF1 (Fig. 20)",
    "target_in_x": "target in LL(x_n) of FF1 (Fig. 21)",
}
GROUPS = ("all", "correct", "incorrect")


class OriginalRankExperiment(Experiment):
    """Figs. 19-21 (App. F.2): lens ranks of the model's original answer and of the target.

    The original answer is the model's top-1 token at the last prompt position; it is "correct"
    when it is the first token of the record's ``target_true``. Ranks are 0 for the most probable
    token and |V| - 1 for the least probable.
    """

    name = "original-rank"
    title = "Rank of the model's original answer (paper Figs. 19-21)"
    paper = (
        "Figs. 19-21 (GPT-2 medium/xl, Llama-2-7B): about 84% of CounterFact prompts are answered "
        "incorrectly (mostly function words). The original answer ranks on the probable side of "
        "LL(δ_n) in the last layers, but not extremely (the update subtracts it softly); in FF1's "
        "x_n a correct answer's rank improves through the first half of the layers."
    )
    matrices = ("ff1", "ff2")

    def measure(
        self, lm: LensModel, item: Item, capture: Capture, options: StudyOptions
    ) -> dict[str, Any]:
        """Lens ranks of the original answer and the target at the last position of one prompt.

        Returns:
            ``answer_id``, ``answer`` (its label), ``true_id`` (None without ``target_true``),
            ``correct`` (None if unknown) and three [layers] rank lists: ``answer_in_delta`` (in
            LL(delta_n) of FF2, Fig. 19), ``answer_in_x`` (in LL(x_n) of FF1, Fig. 20) and
            ``target_in_x`` (the target in LL(x_n) of FF1, Fig. 21).
        """
        answer = capture.prediction_id
        true_id = None
        if item.record.target_true and item.record.target_true.strip():
            true_id = encode_request(
                lm.tokenizer, item.record.prompt, item.record.target_true, multi_token="first"
            ).target_ids[0]
        delta_n = capture.stack("ff2", "delta")[:, -1]  # [L, d]
        x_n = capture.stack("ff1", "x")[:, -1]
        return {
            "answer_id": answer,
            "answer": lm.decode([answer])[0],
            "true_id": true_id,
            "correct": None if true_id is None else bool(answer == true_id),
            "answer_in_delta": lm.lens.rank_of(delta_n, answer).tolist(),
            "answer_in_x": lm.lens.rank_of(x_n, answer).tolist(),
            "target_in_x": lm.lens.rank_of(x_n, capture.target_id).tolist(),
        }

    def aggregate(self, rows: Sequence[dict[str, Any]], meta: dict[str, Any]) -> Aggregate:
        """Mean normalised ranks (rank / (|V| - 1)) per group (all, correct, incorrect) and layer.

        Args:
            rows: the records' :meth:`measure` rows.
            meta: run metadata; reads ``n_layers`` and ``vocab_size``.

        Returns:
            Table rows ``group, records, layer, layer_norm`` plus one column per quantity; a curve
            per (quantity, group); headline with the accuracy, the most common answers and summary
            ranks per quarter of the layers.
        """
        n_layers, top = int(meta["n_layers"]), int(meta["vocab_size"]) - 1
        axis = layer_axis(n_layers)
        members = {
            "all": list(rows),
            "correct": [r for r in rows if r["correct"] is True],
            "incorrect": [r for r in rows if r["correct"] is False],
        }
        table, curves = [], {}
        means: dict[str, dict[str, np.ndarray]] = {}
        for group, rs in members.items():
            if not rs:
                continue
            means[group] = {}
            for q in QUANTITIES:
                m = np.array([r[q] for r in rs], dtype=float).mean(0) / top
                means[group][q] = m
                curves[f"{q} ({group}, {len(rs)})"] = {"x": axis, "y": m.tolist()}
            for layer in range(n_layers):
                table.append(
                    {"group": group, "records": len(rs), "layer": layer, "layer_norm": axis[layer]}
                    | {q: float(means[group][q][layer]) for q in QUANTITIES}
                )
        known = [r for r in rows if r["correct"] is not None]
        answers: dict[str, int] = {}
        for r in rows:
            answers[r["answer"]] = answers.get(r["answer"], 0) + 1
        last_q = slice(3 * n_layers // 4, n_layers)
        half = n_layers // 2
        a = means["all"]
        headline: dict[str, Any] = {
            "records": len(rows),
            "accuracy": (sum(r["correct"] for r in known) / len(known)) if known else None,
            "n_correct": len(members["correct"]),
            "top_answers": sorted(answers.items(), key=lambda kv: -kv[1])[:8],
            "answer_in_delta_last_quarter": float(a["answer_in_delta"][last_q].mean()),
            "answer_in_delta_min": float(a["answer_in_delta"].min()),
            "answer_in_delta_min_layer": int(a["answer_in_delta"].argmin()),
            "answer_in_delta_first_quarter": float(
                a["answer_in_delta"][: max(1, n_layers // 4)].mean()
            ),
            "target_in_x_last": float(a["target_in_x"][-1]),
        }
        for group in ("correct", "incorrect"):
            if group in means:
                m = means[group]["answer_in_x"]
                headline[f"answer_in_x_{group}_layer0"] = float(m[0])
                headline[f"answer_in_x_{group}_mid"] = float(m[half])
                headline[f"answer_in_x_{group}_last"] = float(m[-1])
        return Aggregate(table, curves, headline)

    def figure(self, agg: Aggregate, meta: dict[str, Any]) -> Any:
        """Figs. 19-21 as three panels: normalised rank per normalised layer, one line per group."""
        plt = pyplot()
        fig, axes = plt.subplots(1, 3, figsize=(12, 3.6), sharey=True)
        styles = {"all": "-", "correct": "--", "incorrect": ":"}
        for ax, (q, title) in zip(axes, QUANTITIES.items(), strict=False):
            for label, c in agg.curves.items():
                if label.startswith(q + " "):
                    group = label.split("(")[1].split(",")[0]
                    ax.plot(c["x"], c["y"], styles[group], marker=".", ms=3, label=label[len(q) :])
            ax.set_title(title, fontsize=8.5)
            ax.set_xlabel("normalised layer index")
            ax.set_ylim(-0.02, 1.02)
            ax.legend(fontsize=7)
        axes[0].set_ylabel("rank / (|V|-1)  (0 = most probable)")
        acc = agg.headline.get("accuracy")
        acc_text = f", model answers the true object in {100 * acc:.0f}%" if acc is not None else ""
        fig.suptitle(f"{meta['model']}: {agg.headline['records']} prompts{acc_text}", fontsize=10)
        fig.tight_layout()
        return fig

    def finding(self, agg: Aggregate, meta: dict[str, Any]) -> str:
        """State the accuracy and where the original answer sits in LL(delta_n) and LL(x_n)."""
        h = agg.headline
        text = ""
        if h["accuracy"] is not None:
            text += (
                f"The model's top-1 answer is the true object in {100 * h['accuracy']:.0f}% of "
                f"prompts ({h['n_correct']} of {h['records']}); most common answers: "
                + ", ".join(f"{a!r} ×{c}" for a, c in h["top_answers"][:4])
                + ". "
            )
        text += (
            f"In LL(δ_n) the original answer's mean normalised rank is "
            f"{h['answer_in_delta_last_quarter']:.3f} over the last quarter of the layers "
            f"(lowest {h['answer_in_delta_min']:.3f} at layer {h['answer_in_delta_min_layer']}; "
            f"{h['answer_in_delta_first_quarter']:.3f} in the first quarter). "
        )
        if "answer_in_x_correct_layer0" not in h and "answer_in_x_incorrect_layer0" in h:
            text += (
                f"In FF1's x_n the (incorrect) answer moves from "
                f"{h['answer_in_x_incorrect_layer0']:.3f} (layer 0) to "
                f"{h['answer_in_x_incorrect_mid']:.3f} (middle) and "
                f"{h['answer_in_x_incorrect_last']:.3f} (last layer)."
            )
        if "answer_in_x_correct_layer0" in h:
            text += (
                f"In FF1's x_n a correct answer moves from {h['answer_in_x_correct_layer0']:.3f} "
                f"(layer 0) to {h['answer_in_x_correct_mid']:.3f} (middle) and "
                f"{h['answer_in_x_correct_last']:.3f} (last layer)"
            )
            if "answer_in_x_incorrect_mid" in h:
                text += (
                    f"; an incorrect answer from {h['answer_in_x_incorrect_layer0']:.3f} to "
                    f"{h['answer_in_x_incorrect_mid']:.3f} and "
                    f"{h['answer_in_x_incorrect_last']:.3f}"
                )
            text += "."
        return text
