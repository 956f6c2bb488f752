"""Many scenes at once: `xsvggt reconstruct-many` (continuous batching over a pool of stream slots,
prefetching readers, an asynchronous writer, resume, and JAX's multi-process runtime).

    scenes.py  inputs -> unique scene names, the split over processes, completed scenes
    driver.py  the pools (`run_scenes`): refill, gather, step, advance; `reset_slots` between scenes
    offline.py `--offline full|causal`: scenes batched along `data`, long ones split along `seq`
    reader.py  a scene's frames, decoded ahead by a thread
    writer.py  the writer thread: outputs to memory maps, then each scene's files (`io.scene`)
    hosts.py   `jax.distributed.initialize`, the barrier, partial summaries
    run.py     `run_many`: one process's share end to end and ROOT/summary.json
"""

from xsvggt_jax.many.driver import QUERY_POOLS, Job, Stats, group_pools, pool_key, run_scenes
from xsvggt_jax.many.hosts import ClusterError, initialize
from xsvggt_jax.many.offline import offline_groups, run_offline_scenes
from xsvggt_jax.many.run import SceneOptions, run_many
from xsvggt_jax.many.scenes import Scene, SceneListError, name_scenes, process_share, read_manifest

__all__ = ["QUERY_POOLS", "Job", "Stats", "group_pools", "pool_key", "run_scenes", "offline_groups",
           "run_offline_scenes", "ClusterError", "initialize",
           "run_many", "SceneOptions", "Scene", "SceneListError", "name_scenes", "process_share", "read_manifest"]
