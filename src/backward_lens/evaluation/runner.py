"""Computing an evaluation run's lines: edit a group of records, score it, revert.

For each method, every record of a group is edited (timed, model left unchanged), then the
prompts of the whole group are scored together: each batch row carries its own record's edit
through :class:`~backward_lens.evaluation.rowedits.RowEdits`, which is exact for edits of
Linear/Conv1D weights. Edits of other parameters, and ``batch_size=1``, take the plain path:
apply the edit, score that record, revert. :class:`EvalWorker` is what one process (or each Ray
actor) holds: the model, the methods' editors, and the runner.
"""

from __future__ import annotations

import logging
import time
import zlib
from collections.abc import Collection, Iterator, Sequence
from typing import Any

from backward_lens.data import FactRecord
from backward_lens.editing.base import Edit, RewriteRequest
from backward_lens.errors import BackwardLensError
from backward_lens.evaluation.methods import Method, MethodSpec
from backward_lens.evaluation.metrics import fluency, generate_texts, perplexities
from backward_lens.evaluation.records import PreparedRecord, Skipped, prepare_record, wants
from backward_lens.evaluation.rowedits import RowEdits, hookable
from backward_lens.evaluation.scoring import TargetScore, score_targets
from backward_lens.evaluation.settings import EvalSettings
from backward_lens.evaluation.texts import PERPLEXITY_TEXTS
from backward_lens.models import LensModel

log = logging.getLogger(__name__)


class EvalWorker:
    """Computes the result lines of groups of records with one model.

    The in-process path of :func:`~backward_lens.evaluation.harness.evaluate`, and what each
    Ray actor holds (it loads the model once).

    Args:
        lm: the model (left unchanged).
        specs: the methods, in order (editors are built here: unknown names fail at once).
        settings: what is measured and how.
    """

    def __init__(self, lm: LensModel, specs: Sequence[MethodSpec], settings: EvalSettings) -> None:
        self.lm = lm
        self.methods = [Method(lm, s) for s in specs]
        self.runner = GroupRunner(lm, settings)

    def run_iter(
        self, group: Sequence[tuple[int, str, FactRecord]], done: Collection[tuple[str, str]]
    ) -> Iterator[list[dict[str, Any]]]:
        """For each method in turn, the lines of ``group`` not in ``done``, in record order.

        ``group`` holds (position, key, record) triples; each line gets its record's ``key``.

        A method with any line of the group missing computes the whole group (so its batched
        passes hold the same records as in any other run of this group: bit-equal floats) and
        only the missing lines are kept; a method with none missing is not run.
        """
        key_of = {i: key for i, key, _ in group}
        items = [prepare_record(i, record, self.lm) for i, _, record in group]
        for method in self.methods:
            label = method.spec.label
            if all((label, key) in done for key in key_of.values()):
                continue
            rows = self.runner.run_group(method, items)
            yield [
                {"key": key_of[row["index"]], **row}
                for row in rows
                if (label, key_of[row["index"]]) not in done
            ]

    def run(
        self, group: Sequence[tuple[int, str, FactRecord]], done: Collection[tuple[str, str]]
    ) -> list[dict[str, Any]]:
        """Every line of ``group`` not in ``done`` (see :meth:`run_iter`), methods in order."""
        return [row for rows in self.run_iter(group, done) for row in rows]


class GroupRunner:
    """Edits and scores one group of records for one method.

    Args:
        lm: the model (edits are applied per row and reverted; its weights end unchanged).
        settings: what is measured and how it is batched.
    """

    def __init__(self, lm: LensModel, settings: EvalSettings) -> None:
        self.lm = lm
        self.settings = settings
        self._baseline_ppl: float | None = None

    def _row(
        self, method: Method, index: int, record: FactRecord, status: str, **extra: Any
    ) -> dict[str, Any]:
        return {
            "label": method.spec.label,
            "method": method.editor_name,
            "case_id": record.case_id,
            "index": index,
            "status": status,
            **extra,
        }

    def run_group(
        self, method: Method, group: Sequence[PreparedRecord | Skipped]
    ) -> list[dict[str, Any]]:
        """Edit, measure and revert every record of ``group`` for ``method``.

        Records that could not be prepared, or whose edit fails, give ``skipped`` lines (an
        unexpected exception: ``error``) with a reason; the others give ``ok`` lines with their
        metrics and edit time. Batched scoring is used when every edit is hookable.

        Returns:
            One line per record of ``group``, in record order (without ``key``).
        """
        rows: list[dict[str, Any]] = []
        ready: list[tuple[PreparedRecord, Edit | None, float | None, dict[str, Any]]] = []
        together = self._edit_together(
            method, [it for it in group if isinstance(it, PreparedRecord)]
        )
        for it in group:
            if not isinstance(it, PreparedRecord):
                rows.append(self._row(method, it[0], it[1], "skipped", reason=it[2]))
                continue
            if together is not None:
                own, seconds_each = together[it.index]
                info = {"hparams": own.hparams, "edit_info": own.info}
                ready.append((it, own, seconds_each, {**info, "edit_batch": len(together)}))
                continue
            try:
                edit, seconds = self._edit(method, it.request)
            except BackwardLensError as exc:
                rows.append(self._row(method, it.index, it.record, "skipped", reason=str(exc)))
                continue
            except Exception as exc:  # a bug in an editor must not stop a long run
                log.exception("editor %s failed on record %s", method.spec.label, it.record.case_id)
                rows.append(
                    self._row(
                        method, it.index, it.record, "error", reason=f"{type(exc).__name__}: {exc}"
                    )
                )
                continue
            info = {"hparams": edit.hparams, "edit_info": edit.info} if edit is not None else {}
            ready.append((it, edit, seconds, info))
        if ready:
            batched = self.settings.batch_size > 1 and all(
                hookable(self.lm.model, e) for _, e, _, _ in ready
            )
            metrics = self._measure_batched(ready) if batched else self._measure_each(ready)
            for (it, _, seconds, info), m in zip(ready, metrics, strict=True):
                rows.append(
                    self._row(
                        method, it.index, it.record, "ok", metrics=m, time_edit=seconds, **info
                    )
                )
        rows.sort(key=lambda r: r["index"])
        return rows

    def _edit_together(
        self, method: Method, items: Sequence[PreparedRecord]
    ) -> dict[int, tuple[Edit, float]] | None:
        """Single edits of a whole group from one call of the editor's ``each``.

        Shift's probes share one padded forward pass; the time per edit is the call's time / n.
        None when the editor cannot, batching is off, or the call fails.
        """
        each = getattr(method.editor, "each", None)
        if each is None or self.settings.batch_size <= 1 or len(items) < 2:
            return None
        t0 = time.perf_counter()
        try:
            edits = each(self.lm, [it.request for it in items])
        except Exception:  # the per-record path then reports which record failed, and why
            return None
        seconds = (time.perf_counter() - t0) / len(items)
        return {it.index: (e, seconds) for it, e in zip(items, edits, strict=True)}

    def _edit(self, method: Method, request: RewriteRequest) -> tuple[Edit | None, float | None]:
        if method.editor is None:
            return None, None
        t0 = time.perf_counter()
        edit = method.editor(self.lm, [request])
        return edit, time.perf_counter() - t0

    # -- measuring -------------------------------------------------------------------------

    def _seeds(self, it: PreparedRecord) -> list[int]:
        base = zlib.crc32(f"{self.settings.seed}:{it.record.case_id}".encode())
        return [(base + j) % (2**31) for j in range(len(it.prompts.generation))]

    def _measure_batched(
        self, ready: Sequence[tuple[PreparedRecord, Edit | None, float | None, Any]]
    ) -> list[dict[str, Any]]:
        lm, settings = self.lm, self.settings
        edits = [e for _, e, _, _ in ready]
        hooks = RowEdits(lm.model, edits)
        items = [it for it, _, _, _ in ready]
        pairs, owner = [], []
        for k, it in enumerate(items):
            p = it.prompts.pairs()
            pairs += p
            owner += [k] * len(p)
        with hooks.installed():
            scores = score_targets(
                lm,
                pairs,
                batch_size=settings.batch_size,
                on_batch=lambda idx: hooks.set_rows([owner[i] for i in idx]),
            )
            ppl = self._ppl_batched(items, edits, hooks)
            flu = self._fluency_batched(items, hooks)
        out, i = [], 0
        for k, it in enumerate(items):
            n = len(it.prompts.pairs())
            m = it.prompts.metrics(scores[i : i + n])
            i += n
            m["fluency"] = flu.get(k)
            m["perplexity"] = ppl.get(k)
            out.append(m)
        return out

    def _ppl_batched(
        self, items: Sequence[PreparedRecord], edits: Sequence[Edit | None], hooks: RowEdits
    ) -> dict[int, float]:
        want = [k for k, it in enumerate(items) if wants(self.settings.ppl_records, it.index)]
        result: dict[int, float] = {}
        if not want:
            return result
        if all(edits[k] is None for k in want):  # unedited: one computation for the whole run
            value = self._baseline()
            return {k: value for k in want}
        texts = list(PERPLEXITY_TEXTS)
        all_texts, owner = [], []
        for k in want:
            all_texts += texts
            owner += [k] * len(texts)
        values = perplexities(
            self.lm,
            all_texts,
            max_tokens=self.settings.ppl_max_tokens,
            batch_size=self.settings.batch_size,
            on_batch=lambda idx: hooks.set_rows([owner[i] for i in idx]),
        )
        for j, k in enumerate(want):
            chunk = values[j * len(texts) : (j + 1) * len(texts)]
            result[k] = sum(chunk) / len(chunk)
        return result

    def _baseline(self) -> float:
        if self._baseline_ppl is None:
            values = perplexities(
                self.lm,
                PERPLEXITY_TEXTS,
                max_tokens=self.settings.ppl_max_tokens,
                batch_size=self.settings.batch_size,
            )
            self._baseline_ppl = sum(values) / len(values)
        return self._baseline_ppl

    def _fluency_batched(
        self, items: Sequence[PreparedRecord], hooks: RowEdits
    ) -> dict[int, float]:
        want = [k for k, it in enumerate(items) if wants(self.settings.fluency_records, it.index)]
        if not want:
            return {}
        prompts: list[str] = []
        seeds: list[int] = []
        owner: list[int] = []
        for k in want:
            prompts += items[k].prompts.generation
            seeds += self._seeds(items[k])
            owner += [k] * len(items[k].prompts.generation)
        texts = generate_texts(
            self.lm,
            prompts,
            seeds,
            max_length=self.settings.generation_length,
            top_k=self.settings.top_k,
            batch_size=self.settings.batch_size,
            on_batch=lambda idx: hooks.set_rows([owner[i] for i in idx]),
        )
        result: dict[int, float] = {}
        for k in want:
            mine = [t for t, o in zip(texts, owner, strict=True) if o == k]
            value = fluency(mine)
            if value is not None:
                result[k] = value
        return result

    def _measure_each(
        self, ready: Sequence[tuple[PreparedRecord, Edit | None, float | None, Any]]
    ) -> list[dict[str, Any]]:
        """The plain path: apply each edit, score its record alone, revert."""
        lm, settings = self.lm, self.settings
        out = []
        for it, edit, _, _ in ready:
            if edit is not None:
                edit.apply(lm.model)
            try:
                scores: list[TargetScore] = score_targets(
                    lm, it.prompts.pairs(), batch_size=settings.batch_size
                )
                m = it.prompts.metrics(scores)
                m["perplexity"] = None
                if wants(settings.ppl_records, it.index):
                    if edit is None:
                        m["perplexity"] = self._baseline()
                    else:
                        values = perplexities(
                            lm,
                            PERPLEXITY_TEXTS,
                            max_tokens=settings.ppl_max_tokens,
                            batch_size=settings.batch_size,
                        )
                        m["perplexity"] = sum(values) / len(values)
                m["fluency"] = None
                if wants(settings.fluency_records, it.index):
                    texts = generate_texts(
                        lm,
                        it.prompts.generation,
                        self._seeds(it),
                        max_length=settings.generation_length,
                        top_k=settings.top_k,
                        batch_size=settings.batch_size,
                    )
                    m["fluency"] = fluency(texts)
            finally:
                if edit is not None:
                    edit.revert(lm.model)
            out.append(m)
        return out
