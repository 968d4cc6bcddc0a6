"""Importing this module registers every built-in editor with :func:`get_editor`."""

from __future__ import annotations

from backward_lens.editing import finetune, memit, rome, shift

__all__ = ["finetune", "memit", "rome", "shift"]
