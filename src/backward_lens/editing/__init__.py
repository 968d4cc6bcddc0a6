"""Knowledge editors (forward pass shift, fine-tuning, ROME, MEMIT) behind one interface.

Every editor turns rewrite requests into an :class:`Edit`: weight deltas that can be applied,
reverted bit for bit, composed, saved and loaded (``base.py``). The editors by name are in one
table (``table.py``): ``get_editor(name, **hparams)``.
"""

from backward_lens.editing.base import Edit, RewriteRequest, model_fingerprint
from backward_lens.editing.table import EDITORS, EditorSpec, get_editor

__all__ = [
    "EDITORS",
    "Edit",
    "EditorSpec",
    "RewriteRequest",
    "get_editor",
    "model_fingerprint",
]
