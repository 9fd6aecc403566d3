"""How `curate run` sizes scoring to the node: how many scoring actors, what each reserves from the
executor, how many threads its model and its image decoding get, and what is left for the prepare
tasks (read, annotate, fetch) that overlap with scoring.

Resolved once per run from the cluster's resources (`resolve`), recorded in the manifest
(m["layout"]) and printed by `curate show-spec` for this machine. Explicit settings
(`score.actors`, `score.cpu_threads`, `score.decode_threads`) always win; what is left unset is
derived:

Per-node figures come from the executor (Ray: each alive node's CPUs and GPUs; a CPU-less head is
left out); actors are sized for the smallest node that could hold them, since Ray may place an
actor on any of them.

CPU-only cluster
  actors           one per core, single-threaded, up to CPU_ACTORS_PER_NODE per node (then each
                   gets more threads); `score.actors`, or the node's cores / `score.cpu_threads`,
                   otherwise. Windows of a shard go to whichever actor is free, so even one shard
                   keeps them all busy. Why not one actor with a thread per core: torch's intra-op
                   threads wait for each other at every operation, so when a fetch task takes a
                   core from one of them they all stall. Measured on 2 cores, a 768-row shard
                   fetched and scored in windows: 2 actors x 1 thread 37.7-41.2 s of shard time,
                   1 actor x 2 threads 40.4-50.9 s, and 1 x 2 without windows (fetch, then score)
                   34.5-48.4 s on a noisy host (docs/PERFORMANCE.md has the benchmark).
                   Memory: each actor holds its model; for big models set `score.actors`.
  model threads    each actor's share of its node's cores, less its decode threads
  reservation      what the actors reserve is the node's CPUs minus what prepare tasks keep
                   (PREPARE_SHARE of the node, at least 1 CPU), split among the actors, and never
                   more than their threads. Reservations can be fractions, so no number of actors
                   can take every CPU and leave a prepare task waiting forever.
  decode threads   0 (inline) when an actor has at most SMALL_SHARE cores: its model threads
                   take every core, and a decode thread beside them only preempts them (measured
                   on 2 cores: ClipScorer.score 17.9 s inline against 19.0 s with one decode
                   thread, docs/PERFORMANCE.md); beyond, one per SMALL_SHARE cores, taken from the
                   model's threads, so that decode (~4 ms per image per core) keeps up with a
                   model that many cores make fast (not measured here: 2-core hosts)

Windows (both)
  window rows      rows per fetch window, each fetched by one task and scored by one call on
                   whichever actor is free (`score.window_rows` otherwise): 128 on CPUs (a few
                   seconds of scoring, so scoring starts soon after the fetch does), 2048 on GPUs
                   (about a second of a GPU's scoring, so the driver handles few calls per second)

GPU cluster
  actors           one per GPU (`score.actors` otherwise; more actors than GPUs share them)
  GPUs             GPUs / actors each (1 with the default)
  decode threads   enough CPU decoding to feed the GPU: the GPU node's CPUs per GPU after what
                   prepare keeps there (the node with fewest), capped at DECODE_THREADS_PER_GPU (docs/PERFORMANCE.md: decode rate per
                   core against the GPU's scoring rate); the actor reserves that many CPUs
  model threads    1: the GPU does the math
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from curate.config import ScoreConfig
from curate.executor import ClusterInfo

WINDOW_ROWS_CPU = 128  # rows per fetch window / scoring call when actors score on CPUs (seconds each)
WINDOW_ROWS_GPU = 2048  # on GPUs: about a second of an H100's ViT-B-32 scoring per call
CPU_ACTORS_PER_NODE = 8  # single-threaded CPU actors per node at most: then threads per actor grow
SMALL_SHARE = 4  # cores per CPU actor up to which images are decoded inline (see decode threads below)
PREPARE_SHARE = 0.125  # of a node's CPUs kept for prepare tasks (fetch is I/O-bound; resizing is not)
DECODE_THREADS_PER_GPU = 8  # see docs/PERFORMANCE.md: GPU images/s over one core's decode rate


@dataclass(frozen=True)
class ScoreLayout:
    actors: int
    actor_cpus: float  # CPUs each scoring actor reserves from the executor
    actor_gpus: float  # GPUs each scoring actor reserves
    model_threads: int  # torch intra-op threads of each actor's model
    decode_threads: int  # threads decoding the next image batch while the model runs
    prepare_cpus: float  # CPUs each prepare task reserves
    window_rows: int  # rows per fetch window, each scored by one call (score.window_rows, else by device)
    cpus_per_node: float
    nodes: int
    why: str

    def as_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        dev = f"{self.actor_gpus:g} GPU" if self.actor_gpus else "CPU"
        return (
            f"{self.actors} scoring actor(s) on {dev}, each reserving {self.actor_cpus:g} CPU, "
            f"{self.model_threads} model thread(s), {self.decode_threads} decode thread(s); "
            f"prepare tasks reserve {self.prepare_cpus:g} CPU each ({self.nodes} node(s) x {self.cpus_per_node:g} CPU); "
            f"shards fetched and scored in windows of {self.window_rows} rows"
        )


def _down(x: float) -> float:
    """Rounded down to 1/1000 (Ray's resource granularity is 1e-4): sums never exceed the node."""
    return math.floor(x * 1000) / 1000


def _keep(cpus: float) -> float:
    """CPUs a node keeps for prepare tasks: an eighth of it, at least one; half of a node with
    fewer than 2 CPUs."""
    return max(1.0, math.floor(cpus * PREPARE_SHARE)) if cpus >= 2 else cpus / 2


def _shapes(cluster: ClusterInfo) -> list[tuple[float, float]]:
    """(CPUs, GPUs) of each node that can hold work: the executor's per-node figures (a CPU-less
    head is left out), else the totals spread over nodes assumed alike."""
    if cluster.node_shapes:
        shapes = [s for s in cluster.node_shapes if s[0] > 0 or s[1] > 0]
        if shapes:
            return shapes
    n = max(1, int(cluster.nodes))
    return [(cluster.cpus / n if cluster.cpus > 0 else 1.0, cluster.gpus / n)] * n


def resolve(score: ScoreConfig, cluster: ClusterInfo) -> ScoreLayout:
    shapes = _shapes(cluster)
    with_cpus = [c for c, _ in shapes if c > 0] or [1.0]
    smallest = min(with_cpus)  # sized for the smallest node, so an actor fits wherever Ray puts it
    prepare_cpus = 1.0 if smallest >= 2 else smallest / 2
    gpu_nodes = [(c, g) for c, g in shapes if g > 0]
    if gpu_nodes:
        total_gpus = sum(g for _, g in gpu_nodes)
        actors = score.actors or max(1, int(total_gpus))
        gpus = min(1.0, total_gpus / actors)
        # CPUs per GPU on the GPU node that has fewest, after prepare's share of it
        per_gpu = min((c - _keep(c)) / g for c, g in gpu_nodes) if any(c > 0 for c, _ in gpu_nodes) else 0.0
        per_actor = max(0.0, per_gpu * gpus)
        decode = score.decode_threads
        if decode is None:
            decode = max(1, min(DECODE_THREADS_PER_GPU, math.floor(per_actor)))
        actor_cpus = _down(min(float(max(decode, 1)), per_actor))
        threads = score.cpu_threads or 1
        why = (
            f"{total_gpus:g} GPU(s) on {len(gpu_nodes)} node(s): {'score.actors' if score.actors else 'one actor per GPU'}; "
            f"{decode} decode thread(s) per actor from {per_actor:g} CPU(s) per actor after prepare's share"
        )
        window = score.window_rows or WINDOW_ROWS_GPU
        return ScoreLayout(
            actors, actor_cpus, gpus, threads, decode, prepare_cpus, window, smallest, len(gpu_nodes), why
        )
    nodes = len(with_cpus)
    per_node = smallest
    if score.actors:
        per_node_actors = math.ceil(score.actors / nodes)
    elif score.cpu_threads:
        per_node_actors = max(1, math.floor(per_node / score.cpu_threads))
    else:  # one single-threaded actor per core, up to CPU_ACTORS_PER_NODE (then more threads each)
        per_node_actors = max(1, min(math.floor(per_node), CPU_ACTORS_PER_NODE))
    actors = score.actors or per_node_actors * nodes
    cores = max(1, math.floor(per_node / per_node_actors))  # each actor's share of its node
    decode = score.decode_threads
    if decode is None:  # inline on small shares (measured); 1 per SMALL_SHARE cores beyond, from the model's
        decode = 0 if cores <= SMALL_SHARE else cores // SMALL_SHARE
    threads = score.cpu_threads or max(1, cores - decode)
    actor_cpus = _down(min(float(threads + decode), (per_node - _keep(per_node)) / per_node_actors))
    how = "score.actors" if score.actors else "score.cpu_threads" if score.cpu_threads else "one actor per core"
    why = (
        f"CPU only: {how}, {per_node_actors} actor(s) per {per_node:g}-CPU node with {threads} model thread(s) "
        f"each; actors reserve {actor_cpus:g} CPU each so prepare keeps {per_node - actor_cpus * per_node_actors:g}"
    )
    window = score.window_rows or WINDOW_ROWS_CPU
    return ScoreLayout(actors, actor_cpus, 0.0, threads, decode, prepare_cpus, window, per_node, nodes, why)
