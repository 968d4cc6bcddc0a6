"""Causal tracing: where a model recalls a fact.

It follows Meng et al. 2022 (ROME's ``experiments/causal_trace.py``).

:mod:`.core` traces one prompt (batched restorations over one noise sample set), :mod:`.run`
traces N records into a resumable run folder, :mod:`.figures` draws ROME's heatmaps.
"""

from backward_lens.tracing.core import (
    KINDS,
    RecordTrace,
    Restoration,
    TraceConfig,
    Tracer,
    embedding_std,
    restorations_for,
    trace_prompt,
)
from backward_lens.tracing.run import (
    TraceResult,
    chosen_layers,
    layer_support,
    load_trace,
    run_trace,
)

__all__ = [
    "KINDS",
    "RecordTrace",
    "Restoration",
    "TraceConfig",
    "TraceResult",
    "Tracer",
    "chosen_layers",
    "embedding_std",
    "layer_support",
    "load_trace",
    "restorations_for",
    "run_trace",
    "trace_prompt",
]
