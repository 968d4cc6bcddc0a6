"""backward-lens: read language-model gradients in words, and edit facts in one forward pass.

Implements *Backward Lens: Projecting Language Model Gradients into the Vocabulary Space*
(Katz, Belinkov, Geva, Wolf; EMNLP 2024)::

    import backward_lens as bl

    lm = bl.load_model()  # SmolLM2-135M, offline
    expl = bl.explain(lm, "The Eiffel Tower is located in the city of", " Rome")
    expl.to_dataframe()
    cap = bl.capture(lm, "The Eiffel Tower is located in the city of", " Rome")
    cap.gradient(layer=-1, name="ff2").rank()  # 1: Lemma 4.1, last MLP layer
"""

from backward_lens.adapters import ADAPTERS, Adapter, Architecture, MatrixSpec
from backward_lens.capture import Capture, capture, capture_requests
from backward_lens.errors import BackwardLensError
from backward_lens.explain import Explanation, explain
from backward_lens.lens import Projection, VocabularyLens
from backward_lens.lowrank import LowRankGradient
from backward_lens.models import BUILTIN_MODELS, DEFAULT_MODEL, LensModel, load_model, wrap
from backward_lens.tokens import EncodedRequest, encode_request

__version__ = "0.1.0"

__all__ = [
    "ADAPTERS",
    "BUILTIN_MODELS",
    "DEFAULT_MODEL",
    "Adapter",
    "Architecture",
    "BackwardLensError",
    "Capture",
    "EncodedRequest",
    "Explanation",
    "LensModel",
    "LowRankGradient",
    "MatrixSpec",
    "Projection",
    "VocabularyLens",
    "capture",
    "capture_requests",
    "encode_request",
    "explain",
    "load_model",
    "wrap",
]
