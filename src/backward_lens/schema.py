"""What leaves the process, as pydantic models, and the versioned JSON Schemas built from them.

Two documents are a published contract, each with a JSON Schema generated from its model
(:func:`json_schema`), committed under ``schemas/`` and printed by ``backward-lens schema``:

- ``explain``: the JSON ``backward-lens explain --json`` writes (``Explanation.to_dict``),
  :class:`ExplainDocument`.
- ``result-row``: one line of an evaluation run's ``results.jsonl`` (one per record x method),
  :class:`ResultRow`.

Each document carries ``schema_version`` (:data:`SCHEMA_VERSION`); a change that breaks readers
raises it and publishes a new file. The viewer's request and reply bodies are models here too
(:class:`ExplainRequest`, :class:`ExplainReply`, ...), so the web API has one typed definition.

Serialising is :func:`backward_lens.io.dumps`, the one JSON writer (:func:`result_line` is
the result row's line through it); this module describes and validates.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, JsonValue, ValidationError

from backward_lens.errors import DataError, InputError
from backward_lens.io import dumps

SCHEMA_VERSION = 1
"""Version of the explain JSON and of result rows; written into each document."""

SCHEMA_ID = "urn:backward-lens:schema:{name}:v{version}"
"""The ``$id`` of each published schema (a URN: the schemas are files in the repository, not
served from a web address)."""


class _Strict(BaseModel):
    """A model that refuses unknown fields and is read-only once built."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


# -- the explain JSON ---------------------------------------------------------------------------


class TargetTokenModel(_Strict):
    """The target the gradients are taken towards."""

    text: str
    """The target text as given (a space may have been prepended)."""
    token_id: int
    """The token the loss and the ranks use (the first of ``all_token_ids``)."""
    token: str
    """``token_id`` decoded."""
    all_token_ids: list[int]
    """Every token of the target text."""
    trained_token_ids: list[int]
    """The tokens the loss is taken over (the first only, or all under teacher forcing)."""
    all_tokens: list[str]
    """``all_token_ids`` decoded."""


class PredictedTokenModel(_Strict):
    """The model's own next-token prediction at the last prompt position."""

    token: str
    token_id: int
    prob: float
    """Its probability (softmax of the last position's logits)."""


class PositionReadingModel(_Strict):
    """The lens reading of one vector (x_i for FF1, delta_i for FF2) at one position."""

    token: str
    norm: float
    coef_norm: float
    """Norm of the other factor at this position (FF1: ||delta_i^FF1||, FF2: ||x_i^FF2||)."""
    top: list[str]
    top_probs: list[float]
    bottom: list[str]
    bottom_probs: list[float]
    target_rank: int
    """Rank of this position's target token in the reading (0 = most probable)."""
    token_id: int = -1
    top_ids: list[int] = Field(default_factory=list)
    bottom_ids: list[int] = Field(default_factory=list)
    target_id: int = -1
    """The token ``target_rank`` ranks."""


class MatrixReadingModel(_Strict):
    """One matrix of one layer: the gradient's rank and the reading of each position."""

    rank: int
    positions: list[PositionReadingModel] = Field(default_factory=list)


class LayerReadingModel(_Strict):
    """The readings of one block's MLP matrices (``gate`` only for gated MLPs, rank only)."""

    layer: int
    ff1: MatrixReadingModel
    ff2: MatrixReadingModel
    gate: MatrixReadingModel | None = None


class ExplainDocument(_Strict):
    """The backward lens of one (prompt, target) pair: ``backward-lens explain --json``."""

    schema_version: Literal[1]
    """Version of this format (:data:`SCHEMA_VERSION`)."""
    model: str
    vocab_size: int
    prompt: str
    tokens: list[str]
    """The prompt's tokens, decoded one by one."""
    token_ids: list[int]
    target: TargetTokenModel
    prediction: PredictedTokenModel
    loss: float
    """Cross-entropy of the target (nats)."""
    layers: list[LayerReadingModel]
    top_k: int
    normalized: bool
    """Whether the normalised logit lens was used (App. H)."""
    target_prob: float = 0.0
    """The model's probability of the target's first token at the last position."""


# -- evaluation result rows ---------------------------------------------------------------------


class RowMetrics(_Strict):
    """What one edit scored on one CounterFact record (ROME's metrics; null: not measured)."""

    efficacy_acc: float | None
    efficacy_score: float | None
    efficacy_magnitude: float | None
    paraphrase_acc: float | None
    paraphrase_score: float | None
    paraphrase_magnitude: float | None
    neighborhood_acc: float | None
    neighborhood_score: float | None
    neighborhood_magnitude: float | None
    fluency: float | None
    """Weighted 2- and 3-gram entropy of the generated texts (bits)."""
    perplexity: float | None
    """Mean perplexity of the fixed texts under the edited model."""


class ResultRow(_Strict):
    """One line of ``results.jsonl``: one method on one record (``backward-lens evaluate``)."""

    schema_version: Literal[1]
    """Version of this format (:data:`SCHEMA_VERSION`)."""
    key: str
    """The record's stable key (its id, or ``#<position>:<hash>``)."""
    label: str
    """The method as written on the command line (``NAME`` or ``NAME:key=value,...``)."""
    method: str
    """The editor's name (``unedited`` for the baseline)."""
    case_id: int | str
    index: int
    """The record's position in the records file."""
    status: Literal["ok", "skipped", "error"]
    reason: str | None = None
    """Why the record was skipped or failed (``skipped`` / ``error`` only)."""
    metrics: RowMetrics | None = None
    time_edit: float | None = None
    """Seconds the edit took (None for the baseline)."""
    hparams: dict[str, JsonValue] | None = None
    edit_info: dict[str, JsonValue] | None = None
    """What the editor reported (``Edit.info``)."""
    edit_batch: int | None = None
    """Edits computed together in one call of the editor, when they were."""


# -- the viewer's request and reply bodies ------------------------------------------------------


class ExplainRequest(_Strict):
    """``POST /api/explain``, after validation (``web.validation.Body`` checks each field)."""

    prompt: str
    target: str
    model: str | None = None
    top_k: int = 3
    normalized: bool = False
    session: str = "default"
    fresh: bool = False


class ExplainReply(_Strict):
    """The answer to ``POST /api/explain``."""

    explanation: ExplainDocument
    model: str
    n_layers: int
    reused_capture: bool
    seconds: float
    notes: list[str]


class CellRequest(_Strict):
    """``POST /api/cell``, after validation."""

    session: str
    matrix: Literal["ff1", "ff2"]
    layer: int
    position: int
    top_k: int = 5
    neurons: int = 10
    normalized: bool = False


class EditRequest(_Strict):
    """``POST /api/edit``, after validation (``layer`` and ``eta``: None for the defaults)."""

    prompt: str
    target: str
    subject: str = ""
    model: str | None = None
    layer: int | None = None
    eta: float | None = None
    paraphrases: list[str] = Field(default_factory=list)
    neighborhood: list[str] = Field(default_factory=list)
    session: str = "default"


class PromptPrediction(_Strict):
    """Top-1 next token of one prompt, and the target's probability and rank."""

    token: str
    token_id: int
    prob: float
    target_prob: float
    target_rank: int


class CellReading(_Strict):
    """A vector read through the lens: its top and bottom tokens and the target's rank."""

    top: list[str]
    top_probs: list[float]
    bottom: list[str]
    bottom_probs: list[float]
    target_rank: int | None
    """0 = most probable; None when no target was ranked."""


class CellNeuron(CellReading):
    """One neuron the cell's position dominates, and its reading."""

    index: int
    norm: float
    share: float
    """This position's share of the neuron's gradient terms."""
    coefficient: float
    cosine: float
    """Cosine between the neuron's vector and the cell's vector."""


class CellGradient(_Strict):
    """The layer's gradient, and this position's term in it."""

    rank: int
    norm: float
    position_term_norm: float
    position_term_share: float
    n_neurons: int
    n_dominated: int


class CellReply(_Strict):
    """The answer to ``POST /api/cell`` (``web.cells.cell_details``)."""

    matrix: Literal["ff1", "ff2"]
    layer: int
    position: int
    token: str
    normalized: bool
    norm: float
    lens: dict[str, CellReading]
    """The cell's vector under the ``raw`` and the ``normalized`` lens."""
    gradient: CellGradient
    neurons: list[CellNeuron]
    reading: Literal["top", "bottom"]


PromptKind = Literal["prompt", "paraphrase", "neighborhood"]
"""What an edit-panel prompt tests: the edited prompt itself, a paraphrase, or a neighbour."""


class EditedPrompt(_Strict):
    """One prompt of the edit panel, before and after the edit."""

    kind: PromptKind
    prompt: str
    before: PromptPrediction
    after: PromptPrediction


class EditTarget(_Strict):
    """The edit's target text and the token it trains."""

    text: str
    token: str


class EditReply(_Strict):
    """The answer to ``POST /api/edit`` (the model is reverted before it is sent)."""

    model: str
    method: str
    layer: int
    eta: float
    target: EditTarget
    skipped: bool
    info: dict[str, JsonValue]
    delta_norm: float
    parameters: list[str]
    rows: list[EditedPrompt]
    reverted: bool
    seconds: float


class ErrorReply(_Strict):
    """Any refused request: HTTP 400 (a user mistake), 403, 404, 413, 500 or 503."""

    error: str
    """What went wrong, one line for the page."""
    retry_after: int | None = None
    """Seconds to wait before trying again (503 only)."""


# -- schemas ------------------------------------------------------------------------------------

DOCUMENTS: dict[str, type[BaseModel]] = {"explain": ExplainDocument, "result-row": ResultRow}
"""The published documents: name (``backward-lens schema NAME``) -> model."""


def json_schema(name: str) -> dict[str, Any]:
    """The JSON Schema (draft 2020-12) of document ``name``, generated from its model.

    Adds ``$schema``, ``$id`` (:data:`SCHEMA_ID`) and the version to what pydantic's
    ``model_json_schema`` gives.

    Raises:
        InputError: ``name`` is not one of :data:`DOCUMENTS`.
    """
    model = _model(name)
    generated = model.model_json_schema()
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": SCHEMA_ID.format(name=name, version=SCHEMA_VERSION),
        **generated,
    }


def schema_text(name: str) -> str:
    """:func:`json_schema` as the text of the published file (indented, ends in a newline)."""
    return json.dumps(json_schema(name), indent=2, ensure_ascii=False) + "\n"


def schema_file_name(name: str) -> str:
    """The file name a schema is published under: ``<name>.v<version>.json``."""
    _model(name)
    return f"{name}.v{SCHEMA_VERSION}.json"


def validate(name: str, document: Any) -> BaseModel:
    """Check ``document`` (decoded JSON) against document ``name``'s model.

    Returns:
        The validated model.

    Raises:
        InputError: ``name`` is not a published document.
        DataError: the document does not match (the first problems, one line).
    """
    model = _model(name)
    try:
        return model.model_validate(document)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'])) or '(top)'}: {e['msg']}" for e in exc.errors()[:3]
        )
        raise DataError(f"not a valid {name} document (v{SCHEMA_VERSION}): {problems}") from None


def _model(name: str) -> type[BaseModel]:
    try:
        return DOCUMENTS[name]
    except KeyError:
        raise InputError(
            f"no schema named {name!r}; choose one of {', '.join(DOCUMENTS)}"
        ) from None


def result_line(row: dict[str, Any]) -> str:
    """One line of ``results.jsonl`` for ``row`` (with ``schema_version``, no newline).

    Written by the one serialiser, :func:`backward_lens.io.dumps`, with NaN and infinities kept
    (a diverged edit's perplexity must show in the summary, not be skipped as missing) and
    non-ASCII characters escaped, as result lines always were.
    """
    return dumps({**row, "schema_version": SCHEMA_VERSION}, finite=False, ensure_ascii=True)
