"""Ray backend: one job over several worker processes, on this machine or a Ray cluster.

``--workers N`` starts a local Ray cluster of N workers; ``--ray-address ADDR`` (or the
``RAY_ADDRESS`` variable, with ``--workers``) uses an existing cluster with the same command.
Each worker is a Ray actor that loads the model once (from its name, folder or file, with the
run's ``--dtype``/``--device``/``--device-map``) and then computes batches of records that it
pulls from the driver as it becomes free (dynamic load balancing: a slow edit delays only its own
worker). The driver alone writes the results file, in the same format as a one-process run, so
``--resume``, shards and the summary work unchanged. A worker that dies (killed, out of memory)
has its batches given to the others, and a replacement is started; a batch that has killed
three workers stops the run with one line.

Ray is an optional extra (``pip install 'backward-lens[ray]'``); this module imports it only
when a run asks for workers, so the core package never needs it.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
from collections import deque
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from backward_lens import errors
from backward_lens.data import FactRecord
from backward_lens.errors import BackwardLensError, InputError

INSTALL = "pip install 'backward-lens[ray]'"
MAX_ATTEMPTS = 3
"""A batch is tried on at most this many workers before the run stops."""


def require_ray() -> Any:
    """Import Ray, or fail in one line saying how to install it.

    Raises:
        InputError: Ray is not installed.
    """
    try:
        import ray
    except ImportError:
        raise InputError(
            f"--workers and --ray-address need Ray, which is not installed; install it with: "
            f"{INSTALL}"
        ) from None
    return ray


REACH_SECONDS = 3.0
"""How long :func:`check_reachable` waits for a cluster's port to answer."""


def _unreachable(address: str, why: str) -> str:
    return (
        f"cannot reach the Ray cluster at {address}: {why}; start one with 'ray start --head' "
        "or drop --ray-address"
    )


def ray_host_port(address: str) -> tuple[str, int] | None:
    """The (host, port) a Ray address connects to, or None for ``auto``/``local``.

    ``ray://host[:port]`` is a Ray client server (port 10001 by default); ``host[:port]`` is a
    cluster's GCS (port 6379 by default). IPv6 hosts are written in brackets (``[::1]:6379``).

    Raises:
        InputError: the port is not a number.
    """
    text = address.strip()
    if text.lower() in ("auto", "local", ""):
        return None
    scheme, sep, rest = text.partition("://")
    if not sep:
        scheme, rest = "", text
    rest = rest.split("/", 1)[0]
    default = 10001 if scheme == "ray" else 6379
    if rest.startswith("["):  # [IPv6]:port
        host, _, tail = rest[1:].partition("]")
        port_text = tail[1:] if tail.startswith(":") else ""
    elif rest.count(":") == 1:
        host, _, port_text = rest.partition(":")
    else:
        host, port_text = rest, ""
    try:
        port = int(port_text) if port_text else default
    except ValueError:
        raise InputError(
            f"cannot read the port of the Ray address {address!r}; write HOST:PORT, "
            "ray://HOST:PORT or auto"
        ) from None
    return host or "127.0.0.1", port


def check_reachable(address: str, timeout: float = REACH_SECONDS) -> None:
    """Fail fast when nothing listens at a Ray address.

    One TCP connect with a short timeout before ``ray.init``, which would otherwise wait about
    150 s for an absent cluster.

    Args:
        address: ``--ray-address`` or ``RAY_ADDRESS`` (``auto``/``local`` are not probed).
        timeout: seconds to wait for the connection.

    Raises:
        InputError: the host cannot be resolved or the port does not accept a connection.
    """
    target = ray_host_port(address)
    if target is None:
        return
    try:
        with socket.create_connection(target, timeout=timeout):
            pass
    except OSError as exc:
        why = (exc.strerror or str(exc) or type(exc).__name__).lower()
        if isinstance(exc, TimeoutError) or why == "timed out":
            why = f"no answer within {timeout:g} s"
        raise InputError(_unreachable(address, why)) from None


@dataclass(frozen=True)
class ModelSpec:
    """How each worker loads the model (the arguments of :func:`~backward_lens.models.load_model`).

    Attributes:
        spec: built-in name, hub id, local folder or ``.gguf`` file.
        dtype: parameter dtype name (``float32``, ``bfloat16``...).
        device: ``cpu``, ``cuda``...; None: ``cuda`` when the worker holds a GPU, else ``cpu``.
        device_map: ``"auto"`` to spread the model over the worker's GPUs (give the worker
            several with ``gpus_per_worker``).
        cwd: the driver's folder, against which a relative folder or file is found on a worker
            of this machine (the model keeps its name as given, so ``run.json`` matches a
            one-process run); on other machines the path must exist there too.
    """

    spec: str
    dtype: str = "float32"
    device: str | None = None
    device_map: str | None = None
    cwd: str | None = None

    def source(self) -> str:
        """What to load: ``spec`` made absolute against ``cwd`` when that is a path here."""
        path = Path(self.spec).expanduser()
        if self.cwd and not path.is_absolute() and (Path(self.cwd) / path).exists():
            return str(Path(self.cwd) / path)
        return self.spec


@dataclass(frozen=True)
class Cluster:
    """Where the workers run.

    Attributes:
        workers: number of actors (None with ``address``: as many as the cluster has CPUs, or
            GPUs / ``gpus_per_worker``).
        address: an existing cluster's address (``ray://host:10001``, ``host:6379``, ``auto``);
            None: ``RAY_ADDRESS`` when set, else a new local cluster of ``workers`` CPUs.
        gpus_per_worker: GPUs each actor reserves (fractions share a GPU between small models).
        threads: torch threads per worker (1 keeps N workers on N cores from competing).
    """

    workers: int | None = None
    address: str | None = None
    gpus_per_worker: float = 0.0
    threads: int = 1

    def __post_init__(self) -> None:
        """Refuse resources that cannot start a worker.

        Raises:
            InputError: ``workers`` below 1, negative ``gpus_per_worker`` or ``threads`` below 1.
        """
        if self.workers is not None and self.workers < 1:
            raise InputError(f"--workers must be 1 or more, got {self.workers}")
        if not self.gpus_per_worker >= 0:
            raise InputError(f"--gpus-per-worker must be 0 or more, got {self.gpus_per_worker}")
        if self.threads < 1:
            raise InputError(f"threads per worker must be 1 or more, got {self.threads}")


def _raise_remote(error: dict[str, str]) -> None:
    """Re-raise a user error reported by a worker as the same class, one line."""
    cls = getattr(errors, error["type"], BackwardLensError)
    if not (isinstance(cls, type) and issubclass(cls, BackwardLensError)):
        cls = BackwardLensError
    raise cls(error["message"])


class _Actor:
    """Body of a Ray actor: loads the model once, then runs the jobs it is handed."""

    def __init__(self, model: ModelSpec, threads: int, gpus: float) -> None:
        import torch

        torch.set_num_threads(threads)
        self.error: dict[str, str] | None = None
        self.lm: Any = None
        self.eval_worker: Any = None
        self.sweep: Any = None
        try:
            from backward_lens.models import load_model

            device = model.device
            if device is None and model.device_map is None:
                device = "cuda" if gpus > 0 else "cpu"
            self.lm = load_model(
                model.source(), dtype=model.dtype, device=device, device_map=model.device_map
            )
            self.lm.name = model.spec
        except BackwardLensError as exc:  # reported by facts(), raised in the driver
            self.error = {"type": type(exc).__name__, "message": str(exc)}

    def pid(self) -> int:
        """The worker's process id (tests kill it)."""
        return os.getpid()

    def facts(self) -> dict[str, Any]:
        """The model's facts, or ``{"error": ...}`` when it could not be loaded."""
        if self.error is not None:
            return {"error": self.error}
        from backward_lens.study.runner import model_facts

        return model_facts(self.lm)

    def setup_eval(self, specs: list[Any], settings: Any) -> dict[str, str] | None:
        """Build the editors once; a user error comes back as ``{"type", "message"}``."""
        from backward_lens.evaluation.runner import EvalWorker

        try:
            self.eval_worker = EvalWorker(self.lm, specs, settings)
        except BackwardLensError as exc:
            return {"type": type(exc).__name__, "message": str(exc)}
        return None

    def run_eval(self, group: list[Any], done: set[tuple[str, str]]) -> list[dict[str, Any]]:
        """The result lines of one group of records."""
        rows: list[dict[str, Any]] = self.eval_worker.run(group, done)
        return rows

    def run_study(
        self, exp_name: str, batches: list[Any], options: Any, done: set[str]
    ) -> list[dict[str, Any]]:
        """The raw lines of some whole batches of a study's records (none of ``done``)."""
        from backward_lens.study.runner import compute_rows, get_experiment

        exp = get_experiment(exp_name)
        return list(compute_rows(exp, self.lm, batches, options, done))

    def shift_eta(self) -> float:
        """The model's default eta of forward pass shift (the sweep's default grid)."""
        from backward_lens.editing.defaults import editor_defaults

        return float(editor_defaults(self.lm, "shift")["eta"])

    def setup_sweep(
        self, records: list[Any], layers: list[int], etas: list[float], batch_size: int, fs: Any
    ) -> dict[str, str] | None:
        """Prepare and probe the sweep's records once; a user error comes back as a dict."""
        from backward_lens.evaluation.sweep import ShiftSweep

        try:
            self.sweep = ShiftSweep(
                self.lm, records, layers, etas, batch_size=batch_size, fluency_settings=fs
            )
        except BackwardLensError as exc:
            return {"type": type(exc).__name__, "message": str(exc)}
        return None

    def run_sweep(self, points: list[int]) -> list[Any]:
        """The :class:`~backward_lens.evaluation.sweep.SweepPoint` of each grid position."""
        return [self.sweep.point(p) for p in points]


class _Pool:
    """Actors on a Ray cluster, and the driver's loop that feeds them batches."""

    def __init__(self, model: ModelSpec, cluster: Cluster) -> None:
        self.ray = require_ray()
        self.model, self.cluster = model, cluster
        t0 = time.perf_counter()
        address = cluster.address or os.environ.get("RAY_ADDRESS") or None
        self.started_local = False
        if not self.ray.is_initialized():
            env = {"OMP_NUM_THREADS": str(cluster.threads), "MKL_NUM_THREADS": str(cluster.threads)}
            if address:
                check_reachable(address)  # seconds, not Ray's own 150 s timeout
                try:
                    self.ray.init(
                        address=address, runtime_env={"env_vars": env}, log_to_driver=False
                    )
                except (ConnectionError, RuntimeError, ValueError) as exc:
                    first = str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc)
                    raise InputError(_unreachable(address, first[:200])) from None
            else:
                workers = cluster.workers or 1
                self.ray.init(
                    num_cpus=workers,
                    num_gpus=None,
                    include_dashboard=False,
                    log_to_driver=False,
                    runtime_env={"env_vars": env},
                )
                self.started_local = True
        self.workers = cluster.workers or self._default_workers()
        self.remote = self.ray.remote(num_cpus=1, num_gpus=cluster.gpus_per_worker)(_Actor)
        self.actors: list[Any] = []
        self.replacements = 0
        try:
            self.actors = [self._spawn() for _ in range(self.workers)]
            facts = self.ray.get([a.facts.remote() for a in self.actors])
        except BaseException:
            self.close()
            raise
        self.facts = facts[0]
        if "error" in self.facts:
            self.close()
            _raise_remote(self.facts["error"])
        self.startup_seconds = time.perf_counter() - t0

    def _default_workers(self) -> int:
        resources = self.ray.cluster_resources()
        if self.cluster.gpus_per_worker > 0:
            return max(1, int(resources.get("GPU", 0) / self.cluster.gpus_per_worker))
        return max(1, int(resources.get("CPU", 1)))

    def _spawn(self) -> Any:
        return self.remote.remote(self.model, self.cluster.threads, self.cluster.gpus_per_worker)

    def pids(self) -> list[int]:
        """The process id of every live actor."""
        return list(self.ray.get([a.pid.remote() for a in self.actors]))

    def run(
        self,
        jobs: Sequence[Any],
        submit: Callable[[Any, Any], Any],
        on_done: Callable[[Any, Any], None],
        setup: Callable[[Any], Any] | None = None,
    ) -> None:
        """Run every job on the actors, each next job going to whichever actor frees up first.

        At most two jobs are in flight per actor (one computing, one queued);
        ``on_done(job, value)`` runs in the driver as each finishes. A job whose actor died is
        queued again and the actor replaced (each actor is set up with ``setup(actor)`` first).

        Raises:
            BackwardLensError: a job failed on :data:`MAX_ATTEMPTS` workers, or a worker's setup
                reported a user error.
        """
        ray = self.ray
        queue = deque((job, 0) for job in jobs)
        inflight: dict[Any, tuple[Any, int, Any]] = {}  # future -> (job, attempts, actor)
        if setup is not None:
            self._setup_all(setup)
        load = {id(a): 0 for a in self.actors}

        def feed() -> None:
            for actor in list(self.actors):
                while queue and load.get(id(actor), 0) < 2:
                    job, attempts = queue.popleft()
                    inflight[submit(actor, job)] = (job, attempts, actor)
                    load[id(actor)] = load.get(id(actor), 0) + 1

        feed()
        while inflight:
            ready, _ = ray.wait(list(inflight), num_returns=1)
            future = ready[0]
            job, attempts, actor = inflight.pop(future)
            load[id(actor)] = max(0, load.get(id(actor), 1) - 1)
            try:
                value = ray.get(future)
            except ray.exceptions.RayActorError:
                if attempts + 1 >= MAX_ATTEMPTS:
                    raise BackwardLensError(
                        f"a batch of records stopped {MAX_ATTEMPTS} workers (killed or out of "
                        "memory); run with fewer workers, smaller --group-size/--batch-size, "
                        "or more memory per worker"
                    ) from None
                queue.appendleft((job, attempts + 1))
                if actor in self.actors:
                    load.pop(id(actor), None)
                    new = self._replace(actor, setup)
                    load[id(new)] = 0
                feed()
                continue
            on_done(job, value)
            feed()

    def _replace(self, actor: Any, setup: Callable[[Any], Any] | None) -> Any:
        """Start a new actor in a dead one's place (set up like the others); return it."""
        self.actors.remove(actor)
        self.replacements += 1
        if self.replacements > MAX_ATTEMPTS * self.workers:
            raise BackwardLensError(
                f"{self.replacements} Ray workers died; check the workers' memory and logs "
                "(a worker loads the whole model) or run with fewer workers"
            )
        new = self._spawn()
        self.actors.append(new)
        if setup is not None:
            self._setup_all(setup, [new])
        return new

    def _setup_all(self, setup: Callable[[Any], Any], actors: list[Any] | None = None) -> None:
        """Run ``setup`` on ``actors`` (default: all); replace one that dies meanwhile.

        Raises:
            BackwardLensError: a worker reported a user error (raised as its own class).
        """
        started = [
            (actor, setup(actor)) for actor in list(self.actors if actors is None else actors)
        ]
        for actor, future in started:  # all set up side by side (a sweep's probe takes a while)
            try:
                error = self.ray.get(future)
            except self.ray.exceptions.RayActorError:
                self._replace(actor, setup)
                continue
            if error:
                _raise_remote(error)

    def close(self) -> None:
        """Stop the actors; stop the cluster too when this pool started it."""
        for actor in self.actors:
            with contextlib.suppress(Exception):  # already gone
                self.ray.kill(actor)
        self.actors = []
        if self.started_local:
            self.ray.shutdown()
            self.started_local = False


def _bar(total: int, desc: str, progress: bool, workers: int) -> Any:
    from tqdm.auto import tqdm

    bar = tqdm(total=total, unit="rec", desc=desc, disable=not progress, smoothing=0.1)
    bar.set_postfix(workers=workers)
    return bar


def evaluate_ray(
    model: ModelSpec,
    records: Sequence[FactRecord],
    methods: Sequence[Any],
    out_dir: Any,
    *,
    cluster: Cluster,
    settings: Any = None,
    data: str | None = None,
    resume: bool = False,
    overwrite: bool = False,
    on_result: Callable[[dict[str, Any]], None] | None = None,
    progress: bool = True,
    shard: Any = None,
    on_pool: Callable[[_Pool], None] | None = None,
) -> Any:
    """:func:`~backward_lens.evaluation.harness.evaluate` with the records computed by Ray workers.

    The driver (this process) plans, writes every line and returns the same
    :class:`~backward_lens.evaluation.harness.RunResult`. Lines of a group are written when the
    group is done, groups in the order they finish (the summary orders them by record).

    Args:
        model: how each worker loads the model (the driver never loads it).
        records: CounterFact records, as for ``evaluate``.
        methods: method specs, as for ``evaluate``.
        out_dir: the run folder, as for ``evaluate``.
        cluster: how many workers, where, and with which resources.
        settings: what is measured and how (batching), as for ``evaluate``.
        data: the data file's name recorded in ``run.json``.
        resume: continue the run in ``out_dir``.
        overwrite: discard earlier results in ``out_dir``.
        on_result: called with each line after it is written.
        progress: show a progress bar (records/s and ETA over all workers).
        shard: run only this shard's groups.
        on_pool: called with the started pool (tests use it to kill a worker).

    Raises:
        InputError: Ray missing, bad methods or folder; errors a worker reports while loading
            the model come back as their own class.
    """
    from backward_lens.evaluation.methods import check_methods
    from backward_lens.evaluation.plan import ResultWriter, plan_run
    from backward_lens.evaluation.settings import EvalSettings

    settings = settings or EvalSettings()
    specs = check_methods(methods)  # unknown names fail before a cluster starts
    pool = _Pool(model, cluster)
    try:
        plan = plan_run(
            pool.facts["model"],
            pool.facts["n_layers"],
            records,
            specs,
            out_dir,
            dtype=pool.facts["dtype"],
            settings=settings,
            data=data,
            resume=resume,
            overwrite=overwrite,
            shard=shard,
        )
        if on_pool is not None:
            on_pool(pool)
        desc = f"evaluate {plan.shard}" if plan.shard.sharded else "evaluate"
        bar = _bar(len(plan.todo), desc, progress, pool.workers)
        writer = ResultWriter(plan, on_result)
        groups = [(g, plan.done_in(g)) for g in plan.groups(records)]

        def done(job: Any, rows: list[dict[str, Any]]) -> None:
            writer.write(rows)
            writer.sync()
            bar.update(len(job[0]))
            bar.set_postfix(workers=len(pool.actors), written=writer.stats["written"])

        try:
            pool.run(
                groups,
                lambda actor, job: actor.run_eval.remote(job[0], job[1]),
                done,
                setup=lambda actor: actor.setup_eval.remote(specs, settings),
            )
        finally:
            writer.close()
            bar.close()
        return writer.result()
    finally:
        pool.close()


class RayStudy:
    """A :class:`~backward_lens.study.runner.StudyExecutor` on Ray workers.

    Pass it to :func:`~backward_lens.study.runner.run_study` as ``executor``. Workers start on
    the first call (a finished folder only re-aggregates and starts nothing).

    Args:
        model: how each worker loads the model.
        cluster: how many workers, where, and with which resources.
        chunk: records per job handed to a worker, rounded up to whole capture batches
            (default: one batch a job). Batches are never split, so the lines equal a
            one-process run's.
        on_pool: called with the started pool (tests use it to kill a worker).
    """

    def __init__(
        self,
        model: ModelSpec,
        cluster: Cluster,
        chunk: int | None = None,
        on_pool: Callable[[_Pool], None] | None = None,
    ) -> None:
        self.model, self.cluster, self.chunk, self.on_pool = model, cluster, chunk, on_pool
        self.pool: _Pool | None = None
        self.startup_seconds: float | None = None

    def facts(self) -> dict[str, Any]:
        """Start the workers (they load the model) and return the model's facts."""
        if self.pool is None:
            self.pool = _Pool(self.model, self.cluster)
            self.startup_seconds = self.pool.startup_seconds
        return dict(self.pool.facts)

    def compute(
        self,
        exp: Any,
        pending: list[list[tuple[int, FactRecord, str]]],
        done: Collection[str],
        options: Any,
        write: Callable[[dict[str, Any]], None],
        progress: bool,
    ) -> None:
        """Compute the ``pending`` batches on the workers, whole batches a job.

        A job holds ``chunk`` records or more; ``write`` gets each line whose key is not in
        ``done``.
        """
        self.facts()
        pool = self.pool
        assert pool is not None
        try:
            if self.on_pool is not None:
                self.on_pool(pool)
            jobs: list[list[Any]] = []
            for batch in pending:
                if jobs and sum(len(b) for b in jobs[-1]) < (self.chunk or 1):
                    jobs[-1].append(batch)
                else:
                    jobs.append([batch])
            bar = _bar(sum(len(b) for b in pending), exp.name, progress, pool.workers)
            skip = set(done)

            def finished(job: Any, rows: list[dict[str, Any]]) -> None:
                for row in rows:
                    write(row)
                bar.update(sum(len(b) for b in job))
                bar.set_postfix(workers=len(pool.actors))

            try:
                pool.run(
                    jobs,
                    lambda actor, job: actor.run_study.remote(exp.name, job, options, skip),
                    finished,
                )
            finally:
                bar.close()
        finally:
            pool.close()
            self.pool = None


class RaySweep:
    """``sweep --workers``: forward pass shift's grid points computed on Ray workers.

    Each worker loads the model, prepares and probes the records itself, then computes the grid
    points it pulls (one a job); the driver never loads the model and assembles the same table
    as :func:`~backward_lens.evaluation.sweep.shift_sweep`. Workers start on the first call.

    Args:
        model: how each worker loads the model.
        cluster: how many workers, where, and with which resources.
        on_pool: called with the started pool (tests use it).
    """

    def __init__(
        self, model: ModelSpec, cluster: Cluster, on_pool: Callable[[_Pool], None] | None = None
    ) -> None:
        self.model, self.cluster, self.on_pool = model, cluster, on_pool
        self.pool: _Pool | None = None

    def facts(self) -> dict[str, Any]:
        """Start the workers; the model's facts plus ``shift_eta``, its default eta."""
        if self.pool is None:
            self.pool = _Pool(self.model, self.cluster)
            try:
                self.pool.facts["shift_eta"] = self.pool.ray.get(
                    self.pool.actors[0].shift_eta.remote()
                )
            except BaseException:
                self.close()
                raise
        return dict(self.pool.facts)

    def sweep(
        self,
        records: Sequence[FactRecord],
        layers: Sequence[int],
        etas: Sequence[float],
        *,
        batch_size: int = 64,
        progress: bool = True,
        shard: Any = None,
        fluency_settings: Any = None,
    ) -> Any:
        """:func:`~backward_lens.evaluation.sweep.shift_sweep` on the workers.

        Same arguments, same table; the workers are stopped afterwards.

        Raises:
            InputError: a layer the model lacks, bad etas, no usable record (reported by a
                worker, raised here as its own class).
        """
        from backward_lens.distributed.shards import Shard
        from backward_lens.evaluation.sweep import sweep_table

        shard = shard or Shard()
        self.facts()
        pool = self.pool
        assert pool is not None
        try:
            if self.on_pool is not None:
                self.on_pool(pool)
            n_points = 1 + len(layers) * len(etas)
            mine = [p for p in range(n_points) if shard.owns(p)]
            got: dict[int, Any] = {}
            desc = f"sweep {shard}" if shard.sharded else "sweep"
            bar = _bar(len(mine), desc, progress, pool.workers)
            bar.unit = "pt"
            args = (list(records), list(layers), list(etas), batch_size, fluency_settings)

            def finished(job: list[int], points: list[Any]) -> None:
                got.update(zip(job, points, strict=True))
                bar.update(len(job))

            try:
                pool.run(
                    [[p] for p in mine],
                    lambda actor, job: actor.run_sweep.remote(job),
                    finished,
                    setup=lambda actor: actor.setup_sweep.remote(*args),
                )
            finally:
                bar.close()
            return sweep_table([got[p] for p in mine], mine)
        finally:
            self.close()

    def close(self) -> None:
        """Stop the workers (idempotent)."""
        if self.pool is not None:
            self.pool.close()
            self.pool = None
