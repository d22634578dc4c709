"""The answering engine behind `rag serve`: micro-batching on one worker thread.

Requests wait in a bounded queue. The worker takes the oldest one, waits up to `window_s` for more
requests with the same settings (kind, k, decoding), and answers up to `max_batch` of them with one
retrieval and one batched decoding (rag.answering.Asker.stream_many, whose answers equal asking each
question alone). Every request has a deadline: one that expires while queued is answered with a
timeout and never decoded; a batch whose requests have all gone (timed out, client disconnected) stops
between decoding steps. `close` refuses new requests and finishes the queued and running ones.

Results travel to the asyncio side through each Job's event queue (call_soon_threadsafe): the
retrieved passages, one event per generated token (streaming requests), then the answer or an error.
"""

from __future__ import annotations

import asyncio
import ctypes
import functools
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from rag.answering import Answer, Asker, Retrieval, StreamedToken
from rag.config import DecodingConfig

log = logging.getLogger("rag.server")


class QueueFull(Exception):
    """The bounded queue holds max_queue requests: the client should retry later (HTTP 503)."""


class ShuttingDown(Exception):
    """The engine no longer takes requests (HTTP 503)."""


@dataclass(frozen=True)
class Settings:
    """What requests must share to be answered in one batch."""

    kind: str
    k: int
    decoding: DecodingConfig


@dataclass(frozen=True)
class Failure:
    """The error event of a job: `status` is the HTTP status the request gets."""

    status: int
    type: str
    message: str


@dataclass(eq=False)
class Job:
    """One question on its way through the engine; the asyncio side reads `events`."""

    question: str
    settings: Settings
    deadline: float  # time.monotonic() after which nobody waits for the answer
    loop: asyncio.AbstractEventLoop
    tokens: bool = False  # hand out token events (streaming requests)
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    arrived: float = field(default_factory=time.monotonic)
    gone: threading.Event = field(default_factory=threading.Event)  # timed out or disconnected

    def emit(self, event: Retrieval | StreamedToken | Answer | Failure) -> None:
        if not self.gone.is_set():
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)

    def cancel(self) -> None:
        self.gone.set()


@dataclass
class EngineStats:
    batches: int = 0
    answered: int = 0
    expired: int = 0  # deadline passed while queued
    failed: int = 0
    largest_batch: int = 0
    batch_sizes: dict[int, int] = field(default_factory=dict)  # size -> batches of that size


class Engine:
    """One worker thread that answers queued Jobs in micro-batches."""

    def __init__(self, asker: Asker, max_batch: int = 8, window_s: float = 0.01, max_queue: int = 256) -> None:
        if max_batch < 1 or max_queue < 1 or window_s < 0:
            raise ValueError("max_batch and max_queue must be >= 1 and the batching window >= 0")
        self.asker, self.max_batch, self.window_s, self.max_queue = asker, max_batch, window_s, max_queue
        self.stats = EngineStats()
        self._pending: deque[Job] = deque()
        self._cond = threading.Condition()
        self._closing = False
        self._running = 0  # jobs of the batch being answered
        self._thread = threading.Thread(target=self._work, name="rag-engine", daemon=True)
        self._askers: dict[Settings, Asker] = {}
        self._refresh_lock = threading.Lock()

    def start(self) -> None:
        self._thread.start()

    def default_settings(self) -> Settings:
        return Settings(self.asker.model.kind, self.asker.model.k, self.asker.config)

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._closing:
                raise ShuttingDown("the server is shutting down")
            if len(self._pending) >= self.max_queue:
                raise QueueFull(f"{len(self._pending)} requests are queued (--max-queue {self.max_queue})")
            self._pending.append(job)
            self._cond.notify()

    @property
    def queued(self) -> int:
        return len(self._pending)

    @property
    def in_flight(self) -> int:
        return len(self._pending) + self._running

    def close(self, timeout: float | None = None) -> None:
        """Take no new jobs; answer those queued and running, then stop the worker."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # ------------------------------------------------------------------ the worker thread

    def _work(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            try:
                self.follow_updates()
                self._answer(batch)
            finally:
                with self._cond:
                    self._running = 0
                    idle = not self._pending
                if idle:
                    _release_freed_memory()

    def _next_batch(self) -> list[Job] | None:
        with self._cond:
            while True:
                while not self._pending:
                    if self._closing:
                        return None
                    self._cond.wait()
                first = self._pending[0]
                while not self._closing and self._count(first.settings) < self.max_batch:
                    wait = first.arrived + self.window_s - time.monotonic()
                    if wait <= 0:
                        break
                    self._cond.wait(wait)
                batch = [job for job in self._pending if job.settings == first.settings][: self.max_batch]
                for job in batch:
                    self._pending.remove(job)
                live = self._live(batch)
                if live:
                    self._running = len(live)
                    return live

    def _count(self, settings: Settings) -> int:
        return sum(job.settings == settings for job in self._pending)

    def _live(self, batch: list[Job]) -> list[Job]:
        now, live = time.monotonic(), []
        for job in batch:
            if job.gone.is_set():
                continue
            if now >= job.deadline:
                self.stats.expired += 1
                job.emit(Failure(504, "timeout", "the request timed out while queued"))
                continue
            live.append(job)
        return live

    def follow_updates(self) -> None:
        """Pick up a new data version of the knowledge base (rag index add / delete / compact changed it
        in place) by the hot-swap, rag.hotswap.refresh: the next batch retrieves from it with the same
        loaded q(x) and generator. One read of its meta.json when nothing changed."""
        from rag.hotswap import refresh

        with self._refresh_lock:
            model = refresh(self.asker.model)
            if model is not self.asker.model:
                self.asker, self._askers = Asker(model, self.asker.config), {}

    def _asker(self, settings: Settings) -> Asker:
        if settings not in self._askers:
            self._askers[settings] = self.asker.with_settings(settings.kind, settings.k, settings.decoding)
        return self._askers[settings]

    def _answer(self, batch: list[Job]) -> None:
        stream = self._asker(batch[0].settings).stream_many([job.question for job in batch])
        try:
            while True:
                try:
                    event = next(stream)
                except StopIteration as done:
                    answers: list[Answer] = done.value
                    break
                if isinstance(event, Retrieval):
                    for job, passages in zip(batch, event.passages, strict=True):
                        job.emit(Retrieval([passages]))
                else:
                    for token in event:
                        if batch[token.question].tokens:
                            batch[token.question].emit(token)
                if all(job.gone.is_set() for job in batch):
                    stream.close()  # nobody is waiting: stop decoding
                    return
        except Exception as error:  # a failure inside the model must not take the worker down
            log.exception("answering a batch of %d failed", len(batch))
            self.stats.failed += len(batch)
            for job in batch:
                job.emit(Failure(500, "internal_error", f"answering failed: {type(error).__name__}"))
            return
        self.stats.batches += 1
        self.stats.answered += len(batch)
        self.stats.largest_batch = max(self.stats.largest_batch, len(batch))
        self.stats.batch_sizes[len(batch)] = self.stats.batch_sizes.get(len(batch), 0) + 1
        for job, answer in zip(batch, answers, strict=True):
            job.emit(answer)


class LockedRetriever:
    """The retriever for several threads: the engine's batches and /v1/search share one query encoder,
    whose tokenizer must not run twice at once (a fast tokenizer raises "Already borrowed")."""

    def __init__(self, retriever: Any) -> None:
        self._retriever, self.lock = retriever, threading.Lock()

    def retrieve(self, questions: list[str], k: int, *args: Any, **kwargs: Any) -> Any:
        with self.lock:
            return self._retriever.retrieve(questions, k, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._retriever, name)


def _release_freed_memory() -> None:
    """Give the pages a batch's key/value caches used back to the system (glibc keeps them otherwise,
    and the resident size would grow with the largest batch seen)."""
    try:
        _libc().malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


@functools.cache
def _libc() -> Any:
    return ctypes.CDLL("libc.so.6")
