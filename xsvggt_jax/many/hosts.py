"""Many processes (machines) on one `reconstruct-many` run, with JAX's distributed runtime.

`initialize` calls `jax.distributed.initialize` (explicit coordinator, or JAX's cluster
auto-detection: SLURM, Open MPI, TPU pods, ...). Each process runs its share of the scenes
(`scenes.process_share`) on its local devices, writes its partial summary `ROOT/.summary-<I>.json`,
and then all meet at a barrier (`barrier`: the coordination service's, which waits as long as the
slowest process's share takes); afterwards every process reads all partial
summaries (so every process knows whether a scene failed and exits accordingly), process 0 writes
`ROOT/summary.json`, and after a second barrier removes the partial files. ROOT must be a file
system all processes share.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

from xsvggt_jax.errors import ConfigError

log = logging.getLogger(__name__)


class ClusterError(ConfigError):
    """Inconsistent --coordinator / --num-processes / --process-id."""


def check_cluster_args(coordinator: Optional[str], num_processes: Optional[int],
                       process_id: Optional[int]) -> bool:
    """True when the flags ask for a multi-process run; raises ClusterError when they are incomplete."""
    given = [coordinator is not None, num_processes is not None, process_id is not None]
    if not any(given):
        return False
    if not all(given):
        raise ClusterError("--coordinator, --num-processes and --process-id go together")
    if ":" not in coordinator or not coordinator.rsplit(":", 1)[1].isdigit():
        raise ClusterError(f"--coordinator must be HOST:PORT, got {coordinator!r}")
    if not 0 <= process_id < num_processes:
        raise ClusterError(f"--process-id must be in [0, {num_processes}), got {process_id}")
    return True


def initialize(coordinator: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None, auto: bool = False) -> tuple[int, int]:
    """Join the distributed runtime (explicit flags, or auto-detection when `auto`); returns
    (num_processes, process_id), (1, 0) for a single-process run."""
    import jax

    if check_cluster_args(coordinator, num_processes, process_id):
        jax.distributed.initialize(coordinator, num_processes, process_id)
    elif auto:
        jax.distributed.initialize()
    return jax.process_count(), jax.process_index()


def partial_path(root: Path, process_id: int) -> Path:
    return root / f".summary-{process_id}.json"


BARRIER_TIMEOUT_S = 24 * 3600  # processes meet after their share of the scenes: hours apart is legitimate


def barrier(name: str, timeout_s: float = BARRIER_TIMEOUT_S) -> None:
    """All processes wait here (no-op for one process). The coordination service's barrier, which
    `jax.distributed.initialize` set up, with `timeout_s`: the processes arrive after uneven work, and
    a device collective (`multihost_utils.sync_global_devices`) fails when they arrive more than 30 s
    apart (its CPU collectives' first use waits 30 s for the others: seen under load in
    tests/test_many.py's two-process run). That collective is the fallback where the client lacks the
    barrier."""
    import jax

    if jax.process_count() > 1:
        from jax._src import distributed  # the client of jax.distributed.initialize (no public handle)

        client = distributed.global_state.client
        if client is not None and hasattr(client, "wait_at_barrier"):
            client.wait_at_barrier(name, int(timeout_s * 1000))
            return
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def read_partial(root: Path, process_id: int) -> dict:
    """The partial summary process `process_id` wrote (after the barrier)."""
    return json.loads(partial_path(root, process_id).read_text())


def remove_partials(root: Path, num_processes: int) -> None:
    """Remove the partial summaries (files this run wrote) once merged."""
    for k in range(num_processes):
        partial_path(root, k).unlink(missing_ok=True)
