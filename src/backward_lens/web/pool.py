"""The models a server may use: a fixed list, each loaded lazily and used under its own lock.

A request names a model from the list and nothing else, so no request can make the server read a
path. One lock per model means no two requests are ever inside one model's hooks (capture hooks,
an applied edit) at the same time; different models can work in parallel.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from backward_lens.errors import InputError
from backward_lens.models import BUILTIN_MODELS, LensModel, load_model


@dataclass
class ModelSlot:
    """One configured model: its name, how to load it, and the lock around every use."""

    name: str
    loader: Callable[[], LensModel]
    lm: LensModel | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    state: str = "idle"
    """``idle``, ``loading`` or ``busy`` (for the page's progress line)."""
    since: float = 0.0
    waiting: int = 0
    _count_lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @contextmanager
    def use(self) -> Iterator[LensModel]:
        """Hold this model's lock (loading it on first use) for the duration of the block."""
        with self._count_waiting():
            self.lock.acquire()
        try:
            if self.lm is None:
                self._set("loading")
                self.lm = self.loader()
            self._set("busy")
            yield self.lm
        finally:
            self._set("idle")
            self.lock.release()

    @contextmanager
    def _count_waiting(self) -> Iterator[None]:
        with self._count_lock:
            self.waiting += 1
        try:
            yield
        finally:
            with self._count_lock:
                self.waiting -= 1

    def _set(self, state: str) -> None:
        self.state, self.since = state, time.monotonic()

    def status(self) -> dict[str, object]:
        """This model's entry in the page's status line.

        Returns:
            ``name``, ``loaded``, ``state`` (``idle``, ``loading``, ``busy``), ``seconds`` in that
            state (0 when idle), ``waiting`` (requests queued on the lock) and ``n_layers`` (None
            until loaded).
        """
        return {
            "name": self.name,
            "loaded": self.lm is not None,
            "state": self.state,
            "seconds": round(time.monotonic() - self.since, 1) if self.state != "idle" else 0.0,
            "waiting": self.waiting,
            "n_layers": self.lm.n_layers if self.lm is not None else None,
        }


class ModelPool:
    """The configured models, in display order (the first is the default).

    Args:
        slots: the models; their names must be distinct (a later slot replaces an earlier one).

    Raises:
        InputError: no slot.
    """

    def __init__(self, slots: list[ModelSlot]) -> None:
        if not slots:
            raise InputError("the viewer needs at least one model")
        self.slots = {s.name: s for s in slots}
        self.default = slots[0].name

    @classmethod
    def with_builtins(
        cls, lm: LensModel, loader: Callable[..., LensModel] = load_model
    ) -> ModelPool:
        """The loaded model first, then every other built-in offline model (loaded on first use)."""
        slots = [ModelSlot(lm.name, lambda: lm, lm)]
        for name in BUILTIN_MODELS:
            if name != lm.name:
                slots.append(ModelSlot(name, lambda name=name: loader(name)))  # type: ignore[misc]
        return cls(slots)

    @property
    def names(self) -> list[str]:
        """The configured model names, the default first."""
        return list(self.slots)

    def get(self, name: object) -> ModelSlot:
        """The slot a request names (``None`` or ``""``: the default).

        Raises:
            InputError: ``name`` is not a string, or not one of the configured models.
        """
        if name is None or name == "":
            return self.slots[self.default]
        if not isinstance(name, str):
            raise InputError(
                f"model must be a string naming one of: {', '.join(self.slots)} "
                f"(got a {type(name).__name__})"
            )
        if name not in self.slots:
            raise InputError(f"unknown model {name!r}; choose one of: {', '.join(self.slots)}")
        return self.slots[name]

    def status(self) -> list[dict[str, object]]:
        """Every slot's :meth:`ModelSlot.status`, in display order."""
        return [s.status() for s in self.slots.values()]
