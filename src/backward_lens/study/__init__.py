"""The paper's analyses as reproducible experiments over a dataset (``backward-lens study``).

Example::

    from backward_lens.study import run_study, compare_studies
    result = run_study("rank", "counterfact-edit.json", model="smollm2-135m", n=100, seed=0,
                       out="study/smollm2/rank")
    print(result.summary)
    result.to_dataframe()
"""

from __future__ import annotations

from backward_lens.study.base import Aggregate, Experiment, StudyOptions
from backward_lens.study.compare import compare_studies
from backward_lens.study.experiments import EXPERIMENTS
from backward_lens.study.runner import StudyResult, get_experiment, load_study, run_study
from backward_lens.study.segments import SEGMENTS, Segmentation, segment_prompt

__all__ = [
    "EXPERIMENTS",
    "SEGMENTS",
    "Aggregate",
    "Experiment",
    "Segmentation",
    "StudyOptions",
    "StudyResult",
    "compare_studies",
    "get_experiment",
    "load_study",
    "run_study",
    "segment_prompt",
]
