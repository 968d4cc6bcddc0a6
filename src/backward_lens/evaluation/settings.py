"""What an evaluation run measures and how it batches (:class:`EvalSettings`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass(frozen=True)
class EvalSettings:
    """What is measured and how; a resumed run must use the same measuring settings.

    Attributes:
        batch_size: sequences per forward pass (1 = one prompt at a time, the plain path).
        group_size: records whose edited prompts share batches.
        fluency_records: compute fluency on the first this-many records (None: all; 0: none).
        ppl_records: compute perplexity on the first this-many records (None: all; 0: none).
        generation_length: tokens per fluency sample, prompt included (ROME: 100).
        top_k: top-k sampling for fluency (ROME: 5).
        ppl_max_tokens: perplexity texts are cut to this many tokens (paper: 256).
        seed: base seed of the fluency sampling.
    """

    # The metadata makes the command-line options (backward_lens.commands.options).
    batch_size: int = field(
        default=32,
        metadata={"help": "sequences per forward pass (1 = one prompt at a time)", "min": 1},
    )
    group_size: int = field(
        default=16, metadata={"help": "records whose edited prompts share forward passes", "min": 1}
    )
    fluency_records: int | None = field(
        default=None,
        metadata={
            "help": "sample text for n-gram entropy on the first K records only (0: off; it costs "
            "~100 sampled tokens per generation prompt per method)",
            "metavar": "K",
            "default_help": "all",
        },
    )
    ppl_records: int | None = field(
        default=None,
        metadata={
            "help": "measure perplexity on the first K records only (0: off; it costs one forward "
            "pass over 48 sentences per record and method)",
            "metavar": "K",
            "default_help": "all",
        },
    )
    generation_length: int = 100
    top_k: int = 5
    ppl_max_tokens: int = 256
    seed: int = field(default=0, metadata={"help": "of the fluency sampling"})

    def measuring(self) -> dict[str, Any]:
        """Settings that change the numbers (batching does not, up to float rounding)."""
        d = asdict(self)
        d.pop("batch_size")
        d.pop("group_size")
        return d
