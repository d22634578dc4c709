"""Run `rag serve`'s server (rag.cli.serve.serve: uvicorn, graceful shutdown) over a model given as a
RagConfig JSON file: the tests' tiny worlds, whose q(x) is not their knowledge base's d(z) encoder,
so `rag serve`'s flags cannot name them.

    python tests/serve_launcher.py CONFIG.json PORT [--api-key KEY] [--max-batch N] [--window-ms MS]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from rag.answering import Asker
from rag.cli.serve import serve
from rag.config import DecodingConfig, RagConfig, from_dict
from rag.server import Served, ServerConfig, create_app


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("port", type=int)
    parser.add_argument("--api-key", default="")
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--window-ms", type=float, default=10.0)
    parser.add_argument("--max-new-tokens", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(1)
    rag_config = from_dict(RagConfig, json.loads(Path(args.config).read_text(encoding="utf-8")))

    def load() -> Served:
        asker = Asker.load(rag_config, DecodingConfig(num_beams=1, max_new_tokens=args.max_new_tokens))
        return Served(asker, Path(rag_config.index_dir))

    config = ServerConfig(api_key=args.api_key, max_batch=args.max_batch, batch_window_ms=args.window_ms)
    return serve(create_app(load, config), "127.0.0.1", args.port, "warning")


if __name__ == "__main__":
    raise SystemExit(main())
