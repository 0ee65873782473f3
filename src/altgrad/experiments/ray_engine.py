"""Run a grid's cells as Ray tasks: ``altgrad matrix GRID --engine ray [--address HOST:PORT]``.

The runner plans, locks, records and reports every cell exactly as with the local engine
(``runner.run_matrix``); this engine only executes: each cell is one Ray task asking for
``cpus_per_cell`` CPUs and ``gpus_per_cell`` GPUs, and at most as many cells run at once as the
cluster has room for (``slots``), so no cell waits in Ray's queue holding its lock. Without an address
(nor ``RAY_ADDRESS``) a local Ray instance is started for the run (all the machine's cores, no
dashboard, a temporary folder) and shut down after it; with one, the run joins that cluster, whose
nodes must have altgrad installed and see the run folders on a shared file system.

A task sees only its GPUs (Ray sets ``CUDA_VISIBLE_DEVICES``; ``train.device: auto`` trains on the
first of them; with ``gpus_per_cell=0`` it sees none and trains on the CPU) and uses
``cpus_per_cell`` torch threads.
A cell whose worker process dies (node lost, out of memory, killed) is run once more by Ray
(``max_retries=1``; a Python exception is a failed cell, never retried). The retry finds the marker
``<run_dir>/cell.attempt`` that the first attempt left, resumes from the cell's checkpoint if one was
written, and its matrix.json record says ``"retried"``; a second death is a failed cell. On
SIGINT/SIGTERM the runner calls ``stop``: queued tasks are cancelled, running ones get one SIGINT
(``ray.cancel``), stop at a step boundary with a checkpoint and are left ``pending`` for a rerun.

Example::

    >>> with RayEngine(cpus_per_cell=1) as pool:      # doctest: +SKIP
    ...     future = pool.submit(run_one, train_cell, config, False)
    >>> future.result()
    ('completed', None, None)
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from concurrent.futures import Future
from typing import Any

ATTEMPT_MARKER = "cell.attempt"
SHORT_TEMP = "/tmp" if os.path.isdir("/tmp") else None
RETRIED = "its first attempt's worker process died (node lost, out of memory or killed); Ray ran it again"


def import_ray() -> Any:
    """``import ray``, or a one-line error saying how to install it."""
    try:
        import ray
    except ImportError:
        raise ImportError("--engine ray needs Ray: pip install 'altgrad[ray]'") from None
    return ray


def run_attempt(
    run_one: Any, run_cell: Any, config: dict[str, Any], resume: bool, threads: int, gpus: float
) -> tuple:
    """The body of one cell's Ray task: ``run_one(run_cell, config, resume)``, noting the attempt.

    A marker file left by an earlier attempt means that attempt's process died: this is Ray's retry,
    so resume from the checkpoint if there is one, and add ``{"retried": ...}`` to the outcome."""
    if gpus == 0:  # Ray sets CUDA_VISIBLE_DEVICES only for tasks given GPUs: others would all take GPU 0
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    import torch

    from altgrad.training.checkpoint import latest_checkpoint
    from altgrad.training.config import config_from_dict

    torch.set_num_threads(threads)
    run_dir = config_from_dict(config).run_dir
    marker = run_dir / ATTEMPT_MARKER
    retried = marker.exists()
    if retried:
        resume = latest_checkpoint(run_dir / "checkpoints") is not None
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        marker.touch()
    outcome = run_one(run_cell, config, resume)
    marker.unlink(missing_ok=True)
    return (*outcome, {"retried": RETRIED}) if retried else outcome


class RayEngine:
    """Cells as Ray tasks, with the ``slots``/``submit``/``stop`` the runner's pool loop uses.

    ``address`` is an existing cluster (``ray://...`` or ``HOST:PORT``; default ``RAY_ADDRESS``, else a
    local instance started here). ``ray.init`` is called on entry unless Ray is already initialized in
    this process (a test's instance, a notebook's), and only what was started here is shut down."""

    name = "ray"

    def __init__(
        self, address: str | None = None, cpus_per_cell: float = 1, gpus_per_cell: float = 0
    ) -> None:
        if not cpus_per_cell > 0:
            raise ValueError(f"--cpus-per-cell: expected a positive number of CPUs, got {cpus_per_cell}")
        if not gpus_per_cell >= 0:
            raise ValueError(f"--gpus-per-cell: expected 0 or more GPUs, got {gpus_per_cell}")
        self.ray = import_ray()
        self.address = address or os.environ.get("RAY_ADDRESS") or None
        self.cpus_per_cell, self.gpus_per_cell = cpus_per_cell, gpus_per_cell
        self.slots = 0
        self._refs: list[Any] = []
        self._stopped = False
        self._started_here = False
        self._temp_dir: str | None = None

    def __enter__(self) -> RayEngine:
        ray = self.ray
        self._refs, self._stopped = [], False
        if not ray.is_initialized():
            handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
            if self.address:
                ray.init(address=self.address)
            else:
                from .runner import _cores

                # Ray's socket paths must stay under 107 bytes: a short folder, as Ray's own /tmp/ray
                self._temp_dir = tempfile.mkdtemp(prefix="altgrad-ray-", dir=SHORT_TEMP)
                ray.init(num_cpus=_cores(), include_dashboard=False, _temp_dir=self._temp_dir)
            for signum, handler in handlers.items():  # the runner's stop-on-signal handlers stay
                signal.signal(signum, handler)
            self._started_here = True
        self.slots = self._room(ray.cluster_resources())
        self._task = ray.remote(run_attempt).options(
            num_cpus=self.cpus_per_cell, num_gpus=self.gpus_per_cell, max_retries=1, retry_exceptions=False
        )
        return self

    def _room(self, resources: dict[str, float]) -> int:
        """How many cells fit on the cluster at once: its CPUs (and GPUs) over a cell's."""
        cpus, gpus = resources.get("CPU", 0.0), resources.get("GPU", 0.0)
        slots = int(cpus // self.cpus_per_cell)
        if self.gpus_per_cell > 0:
            slots = min(slots, int(gpus // self.gpus_per_cell))
        if slots < 1:
            raise ValueError(
                f"the Ray cluster has {cpus:g} CPUs and {gpus:g} GPUs; a cell asks for "
                f"{self.cpus_per_cell:g} CPUs and {self.gpus_per_cell:g} GPUs "
                "(--cpus-per-cell, --gpus-per-cell)"
            )
        return slots

    def submit(self, run_one: Any, run_cell: Any, config: dict[str, Any], resume: bool) -> Future:
        """Start one cell's task; its future gives ``run_one``'s outcome or raises Ray's task error."""
        from altgrad.training.config import config_from_dict

        # a marker left by a launch that died is no attempt of this one
        (config_from_dict(config).run_dir / ATTEMPT_MARKER).unlink(missing_ok=True)
        threads = max(1, int(self.cpus_per_cell))
        ref = self._task.remote(run_one, run_cell, config, resume, threads, self.gpus_per_cell)
        self._refs.append(ref)
        return ref.future()

    def stop(self) -> None:
        """Cancel queued tasks and send running ones one SIGINT (a second one would abort the run)."""
        if not self._stopped:
            self._stopped = True
            for ref in self._refs:
                self.ray.cancel(ref)

    def __exit__(self, *exc: object) -> None:
        if exc[0] is not None:  # the runner itself failed: no task is left running
            for ref in self._refs:
                self.ray.cancel(ref, force=True)
        if self._started_here:
            self.ray.shutdown()
            if self._temp_dir:
                shutil.rmtree(self._temp_dir, ignore_errors=True)
        self._refs.clear()
