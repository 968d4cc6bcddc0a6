"""Subcommands of the ``backward-lens`` CLI (see ``backward_lens.cli``)."""
