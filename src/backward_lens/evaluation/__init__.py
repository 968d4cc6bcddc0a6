"""CounterFact evaluation of knowledge editors: scoring, metrics, the harness and summaries.

Typical use::

    from backward_lens.models import load_model
    from backward_lens.data import load_records
    from backward_lens.evaluation import evaluate, write_summary

    lm = load_model("smollm2-135m")
    records = load_records("counterfact-edit.json", limit=100)
    evaluate(lm, records, ["unedited", "shift"], "runs/cf100")
    print(write_summary("runs/cf100")[2])
"""

from backward_lens.evaluation.harness import (
    UNEDITED,
    EvalSettings,
    MethodSpec,
    RunResult,
    evaluate,
)
from backward_lens.evaluation.metrics import (
    RecordPrompts,
    fluency,
    generate_texts,
    ngram_entropy,
    perplexities,
    word_tokenize,
)
from backward_lens.evaluation.scoring import TargetScore, score_sequences, score_targets
from backward_lens.evaluation.summary import read_results, summarize, to_markdown, write_summary
from backward_lens.evaluation.texts import PERPLEXITY_TEXTS

__all__ = [
    "PERPLEXITY_TEXTS",
    "UNEDITED",
    "EvalSettings",
    "MethodSpec",
    "RecordPrompts",
    "RunResult",
    "TargetScore",
    "evaluate",
    "fluency",
    "generate_texts",
    "ngram_entropy",
    "perplexities",
    "read_results",
    "score_sequences",
    "score_targets",
    "summarize",
    "to_markdown",
    "word_tokenize",
    "write_summary",
]
