"""Per-model default hyper-parameters of the editors.

Looked up by model name (built-in name or the last part of a hub id / folder), then by
``model_type``; models not listed get layers placed at the same relative depth as the paper's
GPT-2 xl settings (forward pass shift at layer 35 of 48, ROME at 17 of 48, FT at 0 and 35).

The GPT-2 xl values are the paper's (spec §5.3, §6.3). SmolLM2's and Gemma-3's
forward-pass-shift layer and eta were picked by ``backward-lens sweep`` on the validation split.
Their ROME and MEMIT layers come from causal tracing (``backward-lens trace``, ROME's method):
ROME edits the layer whose MLP restoration (window 10) at the subject's last token recovers the
most of the true object's probability, and MEMIT the 5 consecutive layers of highest mean effect
(MEMIT's "critical" MLP layers). ``tracing.chosen_layers`` is that rule, and
``tests/test_tracing.py`` checks these entries against the committed ``summary.json`` files.
"""

from __future__ import annotations

from typing import Any

from backward_lens.models import LensModel

# Relative depths of the paper's GPT-2 xl choices (0-indexed layer / number of layers).
SHIFT_DEPTH = 35 / 48
ROME_DEPTH = 17 / 48

MODEL_DEFAULTS: dict[str, dict[str, dict[str, Any]]] = {
    "gpt2-xl": {
        "shift": {"layer": 35, "eta": 0.24},
        "rome": {"layer": 17},
        "memit": {"layers": [13, 14, 15, 16, 17]},
        "ft-early": {"layer": 0},
        "ft-late": {"layer": 35},
    },
    "smollm2-135m": {
        # chosen by `backward-lens sweep` on 48 counterfact-val records (docs/results)
        "shift": {"layer": 22, "eta": 0.35},
        # causal tracing, docs/results/tracing-smollm2 (48 known_1000 facts the model predicts,
        # 1 noise sample, window 10): the MLP's average indirect effect at the last subject token
        # peaks at layer 2 (0.0502; layer 3: 0.0497, a plateau over layers 0-5 and a second bump
        # at 9-11, 0.04), layers 0-4 have the highest mean (0.043); were ROME 6, MEMIT 3-7 (the
        # paper's relative depth; layer 6 is a dip of this curve, 0.019)
        "rome": {"layer": 2},
        "memit": {"layers": [0, 1, 2, 3, 4]},
        "ft-early": {"layer": 0},
        "ft-late": {"layer": 22},
    },
    "gemma3-270m": {
        # chosen by `backward-lens sweep` on 48 counterfact-val records (docs/results)
        "shift": {"layer": 15, "eta": 0.2},
        # causal tracing, docs/results/tracing-gemma3 (16 known_1000 facts the model predicts,
        # 1 noise sample, window 10): the MLP's average indirect effect at the last subject token
        # peaks at layer 5 (0.062; layer 4: 0.060), layers 4-8 have the highest mean (0.054);
        # were ROME 4, MEMIT 2-5 (the paper's relative depth)
        "rome": {"layer": 5},
        "memit": {"layers": [4, 5, 6, 7, 8]},
        "ft-early": {"layer": 0},
        "ft-late": {"layer": 15},
    },
}
"""model name -> method -> hyper-parameters."""

_FALLBACK_ETA = 0.24


def model_key(lm: LensModel) -> str | None:
    name = lm.name.rstrip("/").split("/")[-1].lower()
    if name.endswith(".gguf"):
        name = name[: -len(".gguf")]
    if name in MODEL_DEFAULTS:
        return name
    for key in MODEL_DEFAULTS:
        if name.startswith(key):
            return key
    return None


def _relative(lm: LensModel, depth: float) -> int:
    return min(lm.n_layers - 1, max(0, round(depth * lm.n_layers)))


def editor_defaults(lm: LensModel, method: str) -> dict[str, Any]:
    """Default hyper-parameters of ``method`` (``shift``, ``rome``, ``memit``, ``ft-early``,
    ``ft-late``) for ``lm``."""
    key = model_key(lm)
    if key is not None and method in MODEL_DEFAULTS[key]:
        return dict(MODEL_DEFAULTS[key][method])
    shift_layer = _relative(lm, SHIFT_DEPTH)
    rome_layer = _relative(lm, ROME_DEPTH)
    fallback: dict[str, dict[str, Any]] = {
        "shift": {"layer": shift_layer, "eta": _FALLBACK_ETA},
        "rome": {"layer": rome_layer},
        "memit": {"layers": list(range(max(0, rome_layer - 4), rome_layer + 1))},
        "ft-early": {"layer": 0},
        "ft-late": {"layer": shift_layer},
    }
    return dict(fallback.get(method, {}))
