"""Running one job as several processes: shards (any launcher) and an optional Ray backend.

- :mod:`backward_lens.distributed.shards`: ``--shard K/N`` (or ``RANK``/``WORLD_SIZE``, or a
  Slurm array) picks every N-th record; each shard writes its own results file in the run folder
  and the summary merges them. Needs nothing beyond the core package.
- :mod:`backward_lens.distributed.ray_backend`: ``--workers N`` / ``--ray-address``; imported
  only when asked for, so the core package imports without Ray.
"""

from backward_lens.distributed.shards import Shard, parse_shard, resolve_shard, shard_files

__all__ = ["Shard", "parse_shard", "resolve_shard", "shard_files"]
