"""The project on a Ray cluster (the optional extra `rag[ray]`; nothing else imports Ray).

- `rag.distributed.shards`: a sharded knowledge base served by Ray actors, one per shard, each
  holding only its slice; scatter/gather with the exact merge of rag.shards.
- `rag.distributed.encoding`: `rag index build --ray`, the passages embedded with Ray Data.
(`rag train --ray-workers N`, Ray Train's TorchTrainer with DDP over gloo, is rag.train_distributed:
it sits above rag.training and the retriever, which this package sits below.)

`connect(address)` joins a cluster once per process, as ray.init reads its address: "auto" the
cluster `ray start` runs on this machine (or RAY_ADDRESS; an error if there is none), "" the same
or else a new local one, "local" always a private one for this process, anything else a cluster
address ("head:6379" or "ray://head:10001"). A process that called ray.init itself keeps its cluster.
"""

from __future__ import annotations

import os
from typing import Any


def ray_module() -> Any:
    try:
        import ray
    except ImportError:
        raise ValueError("Ray is not installed: pip install 'rag[ray]' (ray[default])") from None
    return ray


def connect(address: str = "auto", num_cpus: int | None = None) -> Any:
    """Join (or start) a Ray cluster for this process, once; returns the ray module."""
    ray = ray_module()
    if ray.is_initialized():
        return ray
    options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False,
                               "runtime_env": {"env_vars": rag_environment()}}  # fmt: skip
    ray.init(address=address or None, num_cpus=num_cpus if address in ("", "local") else None, **options)
    return ray


def rag_environment() -> dict[str, str]:
    """The RAG_* settings of this process (cache folder, test pauses), passed on to Ray workers."""
    return {k: v for k, v in os.environ.items() if k.startswith("RAG_")}
