"""Knowledge editors (forward pass shift, fine-tuning, ROME, MEMIT) behind one interface.

Every editor turns rewrite requests into an :class:`Edit`: weight deltas that can be applied,
reverted bit for bit, composed, saved and loaded. See ``base.py``.
"""

from backward_lens.editing.base import (
    EDITORS,
    Edit,
    RewriteRequest,
    get_editor,
    model_fingerprint,
    register_editor,
)

__all__ = [
    "EDITORS",
    "Edit",
    "RewriteRequest",
    "get_editor",
    "model_fingerprint",
    "register_editor",
]
