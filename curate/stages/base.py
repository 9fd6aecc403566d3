"""One shape for the per-shard stages: an Arrow table and the stage's own config section(s) in, an
Arrow table out, and the resources one worker running it needs, declared here by the stage rather
than hard-coded where it is scheduled (curate/runner.py asks the stages).

    annotate     curate/stages/annotate.py         rows -> rows + language, caption length, domain, URL key
    caption_lsh  curate/stages/annotate.py         rows -> rows + caption_lsh, caption_lsh_ngram (when on;
                                                   the MinHash itself: curate/stages/caption_minhash.py)
    fetch        curate/stages/fetch.py            (row, url[, sha256]) -> one status row each, + jpg bytes
    score        curate/stages/score.py            (caption, jpg) -> + clip_score; a model per worker (actor)

`read` is the source (a shard path in, the canonical table out: curate/stages/read.py) and is not a
table-to-table stage. The stages run inside curate/shard_jobs.py: annotate, caption_lsh and fetch
in one prepare task per shard, score in the scoring actors.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from curate.executor import ClusterInfo, Resources, gpus_per_scorer


@dataclass(frozen=True)
class Stage:
    """A table-to-table stage. `fn(table, *sections, shard=name)` gets the spec sections named in
    `sections` (its own first) and the shard's name for its error messages."""

    name: str
    sections: tuple[str, ...]
    fn: Callable[..., pa.Table]
    cpus: float = 1
    wants_gpu: bool = False  # one GPU per worker when the cluster has any, else CPU

    def __call__(self, table: pa.Table, spec: Any, shard: str) -> pa.Table:
        return self.fn(table, *(getattr(spec, s) for s in self.sections), shard=shard)

    def resources(self, cluster: ClusterInfo | None = None, custom: Mapping[str, float] | None = None) -> Resources:
        """What one worker of this stage asks the executor for. A GPU only when the stage wants
        one and the cluster has GPUs (decided from the cluster, never from the driver's own CUDA)."""
        gpus = gpus_per_scorer(cluster) if self.wants_gpu and cluster is not None else 0.0
        return Resources(cpus=self.cpus, gpus=gpus, custom=dict(custom or {}))


def combined(stages: tuple[Stage, ...], cluster: ClusterInfo | None = None) -> Resources:
    """The resources of one worker that runs these stages one after another (a prepare task)."""
    parts = [s.resources(cluster) for s in stages]
    return Resources(cpus=max(p.cpus for p in parts), gpus=max(p.gpus for p in parts))
