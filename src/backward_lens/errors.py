"""Exceptions for mistakes a user can fix.

Every class here carries a one-line message that says what went wrong and what to do instead.
The CLI prints that line and exits with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class BackwardLensError(Exception):
    """Base class of all user-facing errors."""


class InputError(BackwardLensError, ValueError):
    """A prompt, target, layer choice or option value that cannot be used."""


class EmptyPromptError(InputError):
    """The prompt is empty or only white space."""


class PromptTooLongError(InputError):
    """The prompt (plus target) does not fit the model's context."""


class TargetError(InputError):
    """The target is empty, unknown to the tokenizer, or several tokens where one is needed."""


class MultiTokenTargetError(TargetError):
    """The target tokenises into several tokens and no multi-token policy was chosen."""


class ModelNotFoundError(BackwardLensError, FileNotFoundError):
    """A model name, folder or file that cannot be found or loaded."""


class UnsupportedArchitectureError(BackwardLensError):
    """The model's ``model_type`` has no entry in the adapter table."""


class DataError(BackwardLensError):
    """A data file that is missing or has an unexpected layout."""


class EditError(BackwardLensError):
    """An edit that cannot be applied (wrong model, missing file, bad hyper-parameters)."""


class OutputPathError(InputError):
    """An output path that is occupied or cannot be written.

    Occupied means a folder where a file goes, a file where a folder goes, or a folder holding
    other files; the package never overwrites or deletes a user's file.
    """


class CacheError(BackwardLensError):
    """The model conversion cache cannot be written, or an entry's path is taken by a file."""


class PlacementError(BackwardLensError):
    """A model placed where the tools cannot read it (e.g. its embeddings offloaded to disk)."""
