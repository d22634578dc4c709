"""`rag serve`: answer over HTTP (rag.server): the answer API with streaming and provenance, an
OpenAI-compatible chat endpoint, and a web page at http://127.0.0.1:8000/.

    rag serve                                   # the default model and knowledge base, 127.0.0.1:8000
    rag serve --index kb/ --port 8080           # your knowledge base (rag index build --out kb/)
    rag serve --checkpoint runs/t1/checkpoint   # a trained model
    rag serve --host 0.0.0.0 --api-key SECRET   # reachable from elsewhere: clients send the key

The model flags are `rag ask`'s. The port opens at once and /healthz says "loading" until the model
is loaded. Ctrl+C (SIGINT) or SIGTERM stops taking requests, finishes those in flight, then exits.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import signal
import socket
import threading
from pathlib import Path

from rag.cli.model_options import add_model_arguments, decoding_config, model_config
from rag.cli.numbers import COUNT, NON_NEGATIVE, OPTIONAL_COUNT, POSITIVE, integer


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="serve answers over HTTP: API with provenance, OpenAI-compatible chat, web page")
    add_model_arguments(p)
    p.add_argument("--host", default="127.0.0.1", help="bind address (default: loopback only)")
    p.add_argument("--port", type=integer(min=0, max=65535), default=8000)
    p.add_argument("--api-key", default=os.environ.get("RAG_API_KEY", ""),
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $RAG_API_KEY)")
    p.add_argument("--allow-unauthenticated", action="store_true",
                   help="bind a non-loopback --host without --api-key")
    p.add_argument("--model-name", default="rag", help="the model id /v1/models and chat completions report")
    p.add_argument("--max-batch", type=COUNT, default=8, help="questions answered in one batch")
    p.add_argument("--batch-window-ms", type=NON_NEGATIVE, default=10.0,
                   help="how long a request waits for others to share its batch")
    p.add_argument("--max-queue", type=COUNT, default=256, help="queued requests beyond this get 503")
    p.add_argument("--timeout", type=POSITIVE, default=300.0, help="seconds per request, queueing included")
    p.add_argument("--max-body-bytes", type=integer(min=1024), default=64 * 1024)
    p.add_argument("--threads", type=OPTIONAL_COUNT, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--log-level", choices=["critical", "error", "warning", "info", "debug"], default="info")
    p.set_defaults(func=run)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_args(args: argparse.Namespace) -> None:
    """The flag errors argparse's types cannot see, before any model is loaded or any port is bound."""
    if not _is_loopback(args.host) and not args.api_key and not args.allow_unauthenticated:
        raise ValueError(f"--host {args.host} is reachable from other machines: give --api-key "
                         "(or --allow-unauthenticated)")  # fmt: skip
    if args.index:
        from rag.io import read_format_json
        from rag.knowledge import FORMAT, META_FILE

        read_format_json(Path(args.index), META_FILE, FORMAT, "knowledge base (rag index build)")
    with socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET) as probe:
        try:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind((args.host, args.port))
        except OSError as error:
            raise ValueError(f"cannot listen on {args.host}:{args.port}: {error.strerror}") from None


# oneDNN (and PyTorch's ideep layer over it) keep a compiled kernel per matrix shape, up to 1024 each by
# default. Prompts of new lengths are new shapes, so a server's memory would grow with every distinct
# prompt length it meets, by about 3 MB each (measured with SmolLM2-135M in bfloat16: +90 MB over 30
# distinct questions, flat after 15 with these caps). Decoding steps reuse a few shapes, which stay cached.
KERNEL_CACHE_CAPACITY = "64"


def bound_kernel_caches() -> None:
    """Cap the per-shape kernel caches (before the first matrix product; a value the user set stays)."""
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", KERNEL_CACHE_CAPACITY)
    os.environ.setdefault("LRU_CACHE_CAPACITY", KERNEL_CACHE_CAPACITY)


def run(args: argparse.Namespace) -> int:
    import torch

    from rag.answering import Asker
    from rag.server import Served, ServerConfig, create_app

    check_args(args)
    decoding, rag_config = decoding_config(args), model_config(args)
    bound_kernel_caches()
    if args.threads:
        torch.set_num_threads(args.threads)

    def load() -> Served:
        from rag.knowledge import default_knowledge_base, query_encoder_config

        asker = Asker.load(rag_config, decoding, args.device)
        index_dir = Path(rag_config.index_dir) if rag_config.index_dir else default_knowledge_base(progress=False)
        query = rag_config.query_encoder or query_encoder_config(index_dir)  # the one rule, as the model used
        model = {"checkpoint": args.checkpoint or None, "reader": None if args.checkpoint else args.reader,
                 "generator_deltas": list(rag_config.generator.deltas), "query_encoder": query.path,
                 "retriever": rag_config.retriever.kind, "prompt": rag_config.generator.prompt,
                 "torch_threads": torch.get_num_threads()}  # fmt: skip
        return Served(asker, index_dir.resolve(), model)

    config = ServerConfig(model_name=args.model_name, api_key=args.api_key, max_batch=args.max_batch,
                          batch_window_ms=args.batch_window_ms, max_queue=args.max_queue, timeout_s=args.timeout,
                          max_body_bytes=args.max_body_bytes)  # fmt: skip
    print(f"rag serve: http://{args.host}:{args.port}/ (API: /v1/answer, /v1/search, /v1/chat/completions; "
          f"docs: /docs); loading the model ...", flush=True)  # fmt: skip
    return serve(create_app(load, config), args.host, args.port, args.log_level)


def _stopped(signum: int, frame: object) -> None:
    """The signal uvicorn re-raises once it has stopped gracefully: nothing is left to do."""


def serve(app, host: str, port: int, log_level: str = "info") -> int:
    """Run the app (rag.server.create_app) under uvicorn until SIGINT / SIGTERM: then stop taking
    connections, finish the requests in flight, stop the engine. A model that fails to load stops it."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                           access_log=log_level == "debug"))  # fmt: skip
    state = app.state.rag

    def stop() -> None:
        server.should_exit = True

    state.on_failure = stop
    logging.getLogger("rag.server").setLevel(log_level.upper())
    # uvicorn re-raises the stopping signal after its graceful shutdown, to the handler it found: this
    # one, so that a stop by Ctrl+C or SIGTERM ends with exit status 0 instead of a KeyboardInterrupt.
    main_thread = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.signal(sig, _stopped) for sig in (signal.SIGINT, signal.SIGTERM)} if main_thread else {}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if state.status == "failed":
        raise ValueError(f"the model failed to load: {state.error}")
    return 0
