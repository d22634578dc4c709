"""`rag train --ray-workers N`: data-parallel RAG fine-tuning with Ray Train (TorchTrainer, DDP over gloo).

Each of the N workers holds a replica of q(x) and the generator (DDP averages their gradients after
every backward) and takes its 1/N of each global batch: worker r gets examples [r*B, (r+1)*B) of the
2B-example batch a single process with batch 2B would take (rag.training.batch_order). The loss is a
mean over the batch, so the averaged gradient is the single process's, and N workers with batch B
follow the loss curve of one process with batch N*B to rounding.

The retriever is shared, not copied: the knowledge base's shards are served by Ray actors
(rag.distributed.shards) that every worker queries; no worker opens the index itself. Only worker 0
writes the run folder (log.jsonl, checkpoint/), which must be on a file system all workers see
(resume reads it back on every worker).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rag.config import TrainConfig
from rag.distributed import connect


def _worker(loop: dict[str, Any]) -> None:
    """One Ray Train worker: its model replica over the shared retriever, DDP, the training loop."""
    import ray.train
    import ray.train.torch
    import torch

    from rag.encoders import load_encoder
    from rag.generators import load_generator
    from rag.knowledge import query_encoder_config
    from rag.model import RagModel
    from rag.retriever import Retriever
    from rag.training import DataParallel, train

    torch.set_num_threads(loop["threads"])
    config: TrainConfig = loop["config"]
    rag = config.rag
    query_encoder = load_encoder(rag.query_encoder or query_encoder_config(loop["kb"]))
    retriever = Retriever(loop["index"], loop["passages"], query_encoder)  # the shared shard actors
    model = RagModel(query_encoder, retriever, load_generator(rag.generator), rag.kind, rag.k)
    context = ray.train.get_context()
    module = ray.train.torch.prepare_model(model, move_to_device=False,
                                           parallel_strategy_kwargs={"find_unused_parameters": True})  # fmt: skip
    replica = DataParallel(context.get_world_rank(), context.get_world_size(), module)
    result = train(model, loop["train"], config, loop["dev"], loop["out"], resume=loop["resume"],
                   stop_after=loop["stop_after"], overwrite=loop["overwrite"], replica=replica)  # fmt: skip
    ray.train.report({"steps": result.steps, "losses": result.losses})


def train_on_ray(config: TrainConfig, train_data: Sequence[Any], dev_data: Sequence[Any], out_dir: Path | str,
                 workers: int, address: str = "auto", resume: bool = False, stop_after: int | None = None,
                 overwrite: bool = False, threads: int = 1) -> dict[str, Any]:  # fmt: skip
    """Train on `workers` Ray Train workers (one CPU each); returns {"steps", "log"}: the run's last step
    and its log.jsonl records."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from rag.distributed.shards import open_on_ray
    from rag.knowledge import default_knowledge_base

    if workers < 1:
        raise ValueError(f"--ray-workers must be >= 1, got {workers}")
    if len(train_data) < config.batch_size * workers:
        raise ValueError(f"{len(train_data)} training examples < batch_size {config.batch_size} x {workers} workers")
    connect(address)
    out_dir = Path(out_dir).resolve()
    kb = str(config.rag.index_dir or default_knowledge_base())
    index, passages, _ = open_on_ray(kb, address, actor_cpus=0.5)
    loop = {"config": config, "kb": kb, "train": list(train_data), "dev": list(dev_data), "out": str(out_dir),
            "resume": resume, "stop_after": stop_after, "overwrite": overwrite, "index": index, "passages": passages, "threads": threads}  # fmt: skip
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    storage = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".ray", dir=out_dir.parent))
    try:  # Ray Train's own run records: beside the run folder, which worker 0 alone writes
        trainer = TorchTrainer(
            _worker,
            train_loop_config=loop,
            torch_config=TorchConfig(backend="gloo"),
            scaling_config=ScalingConfig(num_workers=workers, use_gpu=False, resources_per_worker={"CPU": threads}),
            run_config=RunConfig(name="rag-train", storage_path=str(storage)),
        )
        metrics = trainer.fit().metrics or {}
    finally:
        shutil.rmtree(storage, ignore_errors=True)
    log = out_dir / "log.jsonl"  # every step's record, written by worker 0 (rag.training)
    records = [json.loads(line) for line in log.read_text(encoding="utf-8").splitlines() if line.strip()] \
        if log.is_file() else []  # fmt: skip
    # Ray Train v2 (ray >= 2.51) returns only metrics reported with a checkpoint, and worker 0 writes
    # its checkpoint itself: the steps come from the log, the whole run's curve (a resumed run's
    # earlier steps included)
    return {"steps": records[-1]["step"] if records else 0, **metrics, "log": records}
