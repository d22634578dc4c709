"""`rag index build --ray`: the passages embedded by a pool of Ray actors with Ray Data.

The build's resumable layout does not change (rag.knowledge): the passage store is written first, then
d(z) in shards of `IndexConfig.shard_size` passages, each an .npy saved atomically. Here the shards that
are missing become the rows of a Ray dataset, and `map_batches` over an actor pool (each actor loads
d(z) once and opens the passage store) encodes each shard exactly as the single-process build does
(same texts, same encoder batch size, one torch thread) and writes it where that build would. So an
interrupted Ray build resumes like any other, and the result equals the single-process build.
The passage store and the work folder must be readable and writable at the same path on every node.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from rag.config import EncoderConfig, from_dict, to_dict
from rag.distributed import connect


class ShardEncoder:
    """A Ray Data actor: loads d(z) once; encodes whole build shards and writes their .npy files."""

    def __init__(self, store_path: str, encoder: dict[str, Any], threads: int) -> None:
        import torch

        from rag.encoders import load_encoder
        from rag.store import PassageStore

        torch.set_num_threads(threads)  # the single-process build's arithmetic, not just its inputs
        self.store = PassageStore.open(store_path)
        self.encoder_config = from_dict(EncoderConfig, encoder)
        self.d_z = load_encoder(self.encoder_config)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from rag.encoders import passage_text
        from rag.io import atomic_path

        for lo, hi, path in zip(batch["lo"], batch["hi"], batch["path"], strict=True):
            passages = self.store.get(np.arange(int(lo), int(hi)))
            vectors = self.d_z.encode([passage_text(p.title, p.text) for p in passages],
                                      batch_size=self.encoder_config.batch_size)  # fmt: skip
            with atomic_path(str(path)) as tmp, open(tmp, "wb") as f:
                np.save(f, vectors)
        return {"rows": batch["hi"] - batch["lo"]}


def encode_shards_on_ray(store_path: Path, encoder: EncoderConfig, jobs: list[tuple[int, int, Path]],
                         workers: int, address: str = "auto", threads: int = 1,
                         progress: bool = False) -> None:  # fmt: skip
    """Encode rows [lo, hi) of the passage store into each job's .npy, on `workers` Ray actors."""
    if workers < 1:
        raise ValueError(f"--ray-workers must be >= 1, got {workers}")
    if not jobs:
        return
    ray = connect(address)
    items = [{"lo": lo, "hi": hi, "path": str(path)} for lo, hi, path in jobs]
    dataset = ray.data.from_items(items, override_num_blocks=len(items)).map_batches(
        ShardEncoder,
        fn_constructor_kwargs={"store_path": str(store_path), "encoder": to_dict(encoder), "threads": threads},
        batch_size=1,  # one build shard per call: each is written as soon as it is encoded
        concurrency=min(workers, len(items)),
        num_cpus=threads,
    )
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(hi - lo for lo, hi, _ in jobs), desc="encoding passages (Ray)", unit="passage")
    for done in dataset.iter_batches(batch_size=None):
        if bar is not None:
            bar.update(int(np.sum(done["rows"])))
    if bar is not None:
        bar.close()
