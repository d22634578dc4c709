"""The HTTP API of `rag serve` (FastAPI): answers with provenance, search, an OpenAI-compatible chat
endpoint, health, and the web page.

    POST /v1/answer             {"question": ...}  -> rag.answering.Answer (as `rag ask --json`)
                                {"question": ..., "stream": true} -> Server-Sent Events:
                                passages, token (one per generated token), answer | error
    POST /v1/search             {"query": ..., "k": 5} -> {"query", "hits"} (as `rag search --json`)
    POST /v1/chat/completions   OpenAI's chat completions over the last user message; `rag` extra field
    GET  /v1/models             the one model served
    GET  /healthz               loading | ready | draining | failed; the model, the knowledge base and
                                its manifest (meta.json), the queue
    GET  /                      the web page (rag/server/static/index.html)

Every error is JSON in OpenAI's shape, {"error": {"message", "type"}}, with a 4xx status for a bad
request (422 for a field out of its limits, 413 for a body over --max-body-bytes, 401 without the
API key) and 503 / 504 when the server is loading, full or shutting down / the request timed out;
tracebacks go to the server's log only.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse

from rag.answering import Answer, Asker, Retrieval, StreamedToken, answer_dict, search_hits
from rag.server import chat
from rag.server.engine import Engine, Failure, Job, LockedRetriever, QueueFull, Settings, ShuttingDown
from rag.server.http import ApiError, auth_dependency, authorised, install_errors
from rag.server.schemas import (
    AnswerRequest,
    ChatCompletion,
    ChatCompletionChunk,
    ChatRequest,
    ErrorResponse,
    Health,
    ModelList,
    ModelOptions,
    SearchRequest,
    SearchResponse,
)

log = logging.getLogger("rag.server")
STATIC = Path(__file__).parent / "static"


@dataclass(frozen=True)
class ServerConfig:
    model_name: str = "rag"  # the id /v1/models and chat completions report
    api_key: str = ""  # "": no authentication (the default bind address is loopback)
    max_batch: int = 8  # questions answered together
    batch_window_ms: float = 10.0  # how long the oldest queued request waits for others to join it
    max_queue: int = 256  # queued requests beyond this get 503
    timeout_s: float = 300.0  # per request, queueing included
    max_body_bytes: int = 64 * 1024


@dataclass(frozen=True)
class Served:
    """What the server answers with: the Asker, and for /healthz where its knowledge base lives."""

    asker: Asker
    index_dir: Path | None = None
    model: dict[str, Any] = field(default_factory=dict)  # what to report about the model


class _State:
    """The app's life: loading -> ready -> draining (or failed)."""

    def __init__(self, load: Served | Callable[[], Served], config: ServerConfig) -> None:
        self.load, self.config = load, config
        self.status, self.error = "loading", ""
        self.served: Served | None = None
        self.engine: Engine | None = None
        self.started = int(time.time())
        self.on_failure: Callable[[], None] | None = None  # rag serve: stop the process

    def finish_loading(self) -> None:
        try:
            served = self.load if isinstance(self.load, Served) else self.load()
            model = served.asker.model
            if not isinstance(model.retriever, LockedRetriever):
                model.retriever = LockedRetriever(model.retriever)
            engine = Engine(served.asker, self.config.max_batch, self.config.batch_window_ms / 1000,
                            self.config.max_queue)  # fmt: skip
            engine.start()
        except Exception as error:  # reported by /healthz; rag serve exits
            log.exception("loading the model failed")
            self.status, self.error = "failed", f"{type(error).__name__}: {error}"
            if self.on_failure is not None:
                self.on_failure()
            return
        if self.status == "draining":  # the server stopped while the model was loading
            engine.close()
            return
        self.served, self.engine, self.status = served, engine, "ready"
        log.info("ready: %s", self.describe_model())

    def ready_engine(self) -> Engine:
        if self.status == "loading":
            raise ApiError(503, "loading", "the model is loading; retry shortly", {"Retry-After": "5"})
        if self.status == "failed":
            raise ApiError(503, "failed", f"the model failed to load: {self.error}")
        if self.status == "draining" or self.engine is None:
            raise ApiError(503, "shutting_down", "the server is shutting down")
        return self.engine

    def describe_model(self) -> dict[str, Any]:
        assert self.served is not None
        model = (self.engine or self.served).asker.model  # the engine follows updates
        return {
            "name": self.config.model_name,
            "kind": model.kind,
            "k": model.k,
            "decoding": asdict(self.served.asker.config),
            "generator": model.generator.generator_config.path,
            "generator_dtype": str(next(model.generator.parameters()).dtype).removeprefix("torch."),
            **self.served.model,
        }

    def describe_knowledge_base(self) -> dict[str, Any]:
        assert self.served is not None
        index = (self.engine or self.served).asker.model.retriever.index  # the engine follows updates
        out: dict[str, Any] = {"passages": len(index), "dim": getattr(index, "dim", None)}
        index_dir = self.served.index_dir
        if index_dir is not None:
            out["path"] = str(index_dir)
            meta = Path(index_dir) / "meta.json"
            out["manifest"] = json.loads(meta.read_text(encoding="utf-8")) if meta.is_file() else None
        return out


def create_app(load: Served | Callable[[], Served], config: ServerConfig = ServerConfig()) -> FastAPI:
    """The app; `load` is what it serves, or a function that loads it (run in a thread at start-up, so
    /healthz answers "loading" meanwhile)."""
    state = _State(load, config)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        if isinstance(load, Served):
            state.finish_loading()
        else:
            loop.run_in_executor(None, state.finish_loading)
        yield
        # uvicorn has finished the requests in flight; the engine then has none left to answer
        state.status = "draining"
        if state.engine is not None:
            await loop.run_in_executor(None, state.engine.close)

    app = FastAPI(title="rag", version="1", lifespan=lifespan, description=__doc__,
                  responses={"4XX": {"model": ErrorResponse}, "5XX": {"model": ErrorResponse}})  # fmt: skip
    app.state.rag = state
    install_errors(app, config.max_body_bytes)
    auth = auth_dependency(config.api_key)

    @app.get("/healthz", response_model=Health)
    def healthz(request: Request) -> JSONResponse:
        body: dict[str, Any] = {"status": state.status, "error": state.error or None}
        if state.status == "ready" and authorised(request, config.api_key):
            assert state.engine is not None
            body["model"] = state.describe_model()
            body["knowledge_base"] = state.describe_knowledge_base()
            body["engine"] = {"queued": state.engine.queued, "in_flight": state.engine.in_flight,
                              "max_queue": config.max_queue, "max_batch": config.max_batch,
                              "batch_window_ms": config.batch_window_ms, **asdict(state.engine.stats)}  # fmt: skip
        return JSONResponse(body, status_code=200 if state.status == "ready" else 503)

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/v1/models", response_model=ModelList, dependencies=[Depends(auth)])
    def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": config.model_name, "object": "model", "created": state.started,
                                            "owned_by": "rag"}]}  # fmt: skip

    @app.post("/v1/search", response_model=SearchResponse, dependencies=[Depends(auth)])
    def search(body: SearchRequest) -> dict[str, Any]:
        engine = state.ready_engine()
        engine.follow_updates()
        retriever = engine.asker.model.retriever
        if body.k > len(retriever.index):
            raise ApiError(422, "invalid_request_error", f"k = {body.k} exceeds the {len(retriever.index)} passages")
        retrieved = retriever.retrieve([body.query], body.k)
        return {"query": body.query, "hits": search_hits(retrieved, 0)}

    @app.post(
        "/v1/answer",
        response_model=Answer,
        dependencies=[Depends(auth)],
        responses={200: {"content": {"text/event-stream": {}},
                         "description": "the Answer; with stream: Server-Sent Events"}},  # fmt: skip
    )
    async def answer(body: AnswerRequest) -> Any:
        job = _submit(state, body.question, body, tokens=body.stream)
        if body.stream:
            return _event_stream(_answer_events(job))
        return JSONResponse(answer_dict(await _final(job)))

    @app.post(
        "/v1/chat/completions",
        response_model=ChatCompletion,
        dependencies=[Depends(auth)],
        responses={200: {"content": {"text/event-stream": {"schema": ChatCompletionChunk.model_json_schema()}},
                         "description": "a chat completion; with stream: chat.completion.chunk events"}},  # fmt: skip
    )
    async def chat_completions(body: ChatRequest) -> Any:
        try:
            question = chat.question_of(body.messages)
        except chat.NoQuestion as error:
            raise ApiError(422, "invalid_request_error", str(error)) from None
        options = (body.rag or ModelOptions()).model_copy()
        limit = body.max_completion_tokens or body.max_tokens
        if limit is not None:
            options.max_new_tokens = limit
        job = _submit(state, question, options, tokens=body.stream)
        completion = chat.Completion(f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), config.model_name,
                                     state.served.asker.model.generator.eos_token_id)  # type: ignore[union-attr]  # fmt: skip
        if body.stream:
            return _event_stream(_chat_events(job, completion))
        return JSONResponse(completion.message(await _final(job)))

    return app


# ---------------------------------------------------------------- requests into the engine


def _settings(engine: Engine, options: ModelOptions) -> Settings:
    base = engine.default_settings()
    index_size = len(engine.asker.model.retriever.index)
    k = options.k or base.k
    if k > index_size:
        raise ApiError(422, "invalid_request_error", f"k = {k} exceeds the {index_size} passages of the knowledge base")
    decoding = base.decoding
    if options.beams is not None:
        decoding = replace(decoding, num_beams=options.beams)
    if options.decoding is not None:
        decoding = replace(decoding, decoding=options.decoding)
    if options.max_new_tokens is not None:
        decoding = replace(decoding, max_new_tokens=options.max_new_tokens,
                           min_new_tokens=min(decoding.min_new_tokens, options.max_new_tokens))  # fmt: skip
    return Settings(options.kind or base.kind, k, decoding)


def _submit(state: _State, question: str, options: ModelOptions, tokens: bool) -> Job:
    engine = state.ready_engine()
    job = Job(question.strip(), _settings(engine, options), time.monotonic() + state.config.timeout_s,
              asyncio.get_running_loop(), tokens=tokens)  # fmt: skip
    try:
        engine.submit(job)
    except QueueFull as error:
        raise ApiError(503, "server_busy", f"the server is busy: {error}; retry later", {"Retry-After": "1"}) from None
    except ShuttingDown as error:
        raise ApiError(503, "shutting_down", str(error)) from None
    return job


async def _events(job: Job) -> AsyncIterator[Retrieval | StreamedToken | Answer | Failure]:
    """The job's events until its answer or failure; a Failure(504) when its deadline passes."""
    try:
        while True:
            remaining = job.deadline - time.monotonic()
            try:
                event = await asyncio.wait_for(job.events.get(), max(remaining, 0.0))
            except TimeoutError:
                yield Failure(504, "timeout", f"no answer within the server's timeout ({job.deadline - job.arrived:.0f} s)")
                return
            yield event
            if isinstance(event, Answer | Failure):
                return
    finally:
        job.cancel()  # answered, timed out or disconnected: the engine stops working for it


async def _final(job: Job) -> Answer:
    async for event in _events(job):
        if isinstance(event, Failure):
            raise ApiError(event.status, event.type, event.message)
        if isinstance(event, Answer):
            return event
    raise ApiError(500, "internal_error", "the answer stream ended without an answer")


class TextDeltas:
    """A stream's text: each token's decoded answer-so-far becomes the piece to append. Text that ends
    in an incomplete character (U+FFFD) waits for the next token; the answer flushes the rest."""

    def __init__(self) -> None:
        self.shown = ""

    def delta(self, text: str) -> str:
        if text.endswith("\ufffd") or not text.startswith(self.shown):
            return ""
        piece, self.shown = text[len(self.shown) :], text
        return piece

    def rest(self, answer: str) -> str:
        return self.delta(answer)


def _sse(data: dict[str, Any] | str, event: str | None = None) -> str:
    payload = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, allow_nan=False)
    return (f"event: {event}\n" if event else "") + f"data: {payload}\n\n"


def _event_stream(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(events, media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})  # fmt: skip


def token_event(token: StreamedToken, text: TextDeltas) -> dict[str, Any]:
    return {"step": token.step, "token_id": token.token_id, "token": token.token, "delta": text.delta(token.text),
            "posterior": token.posterior, "running_posterior": token.running}  # fmt: skip


async def _answer_events(job: Job) -> AsyncIterator[str]:
    text = TextDeltas()
    settings = job.settings
    decoding = "greedy" if settings.decoding.num_beams == 1 else "beam"
    if settings.kind == "sequence":
        decoding = settings.decoding.decoding
    async for event in _events(job):
        if isinstance(event, Retrieval):
            yield _sse({"question": job.question, "kind": settings.kind, "k": settings.k, "decoding": decoding,
                        "passages": [asdict(p) for p in event.passages[0]]}, "passages")  # fmt: skip
        elif isinstance(event, StreamedToken):
            yield _sse(token_event(event, text), "token")
        elif isinstance(event, Answer):
            yield _sse(answer_dict(event), "answer")
        else:
            yield _sse(_error_body(event), "error")


async def _chat_events(job: Job, completion: chat.Completion) -> AsyncIterator[str]:
    text = TextDeltas()
    async for event in _events(job):
        if isinstance(event, Retrieval):
            yield _sse(completion.first_chunk(event.passages[0]))
        elif isinstance(event, StreamedToken):
            yield _sse(completion.token_chunk(token_event(event, text)))
        elif isinstance(event, Answer):
            rest = text.rest(event.answer)
            if rest:
                yield _sse(completion.content_chunk(rest))
            yield _sse(completion.last_chunk(event))
            yield _sse("[DONE]")
        else:
            yield _sse(_error_body(event))


def _error_body(failure: Failure) -> dict[str, Any]:
    return {"error": {"message": failure.message, "type": failure.type, "param": None, "code": str(failure.status)}}
