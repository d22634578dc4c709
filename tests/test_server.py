"""`rag serve` (rag.server): the HTTP API against an app instance (httpx), a live uvicorn process driven by
the real `openai` client, the web page in a real headless Chromium, and graceful shutdown.

The model is the synthetic world of conftest (tiny q(x), d(z), a BART reader, a real knowledge base on
disk), as RAG-Token with k = 4 and greedy decoding. The slow test serves the real default model.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from pydantic import TypeAdapter

from rag.answering import Answer, Asker, answer_dict, search_hits, to_json
from rag.config import DecodingConfig, save_json
from rag.server import Served, ServerConfig, create_app
from rag.server.schemas import ChatCompletion

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip
K = 4


@pytest.fixture(scope="module")
def world_model(world):
    """(RagConfig as RAG-Token with k = K, the questions of the world's held-out entities)."""
    task, rag, _, _, _ = world
    return dataclasses.replace(rag, kind="token", k=K), [p.question for p in task.test[:8]]


@pytest.fixture(scope="module")
def served(world_model):
    rag_config, _ = world_model
    asker = Asker.load(rag_config, DecodingConfig(num_beams=1, max_new_tokens=8))
    return Served(asker, Path(rag_config.index_dir))


def call(app, fn):
    """Run `fn(client)` against the app (its start-up and shutdown included) on an httpx client."""

    async def main():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
            async with httpx.AsyncClient(transport=transport, base_url="http://rag", timeout=60) as client:
                return await fn(client)

    return asyncio.run(main())


def sse_events(body: str) -> list[tuple[str, dict]]:
    events = []
    for block in body.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((lines.get("event", "message"), json.loads(lines["data"]) if lines["data"] != "[DONE]" else {}))
    return events


def without_seconds(data: dict) -> dict:
    return {key: value for key, value in data.items() if key != "seconds"}


def test_answer_is_rag_ask_json_and_search_is_rag_search_json(served, world_model):
    _, questions = world_model
    app = create_app(served)

    async def fn(client):
        return (await client.post("/v1/answer", json={"question": questions[0]}),
                await client.post("/v1/search", json={"query": questions[0], "k": 3}))  # fmt: skip

    answer, search = call(app, fn)
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/json"
    want = json.loads(to_json(served.asker.ask(questions[0])))  # what `rag ask --json` prints
    assert without_seconds(answer.json()) == without_seconds(want)
    TypeAdapter(Answer).validate_python(answer.json())  # the documented schema (response_model=Answer)
    assert len(answer.json()["tokens"]) == len(answer.json()["token_ids"]) > 0
    retrieved = served.asker.model.retriever.retrieve([questions[0]], 3)
    assert search.json() == {"query": questions[0], "hits": search_hits(retrieved, 0)}  # `rag search --json`


def test_streamed_answer_hands_out_passages_tokens_and_the_same_answer(served, world_model):
    _, questions = world_model
    app = create_app(served)

    async def fn(client):
        return await client.post("/v1/answer", json={"question": questions[1], "stream": True})

    response = call(app, fn)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.text)
    names = [name for name, _ in events]
    assert names[0] == "passages" and names[-1] == "answer" and set(names[1:-1]) == {"token"}
    final = events[-1][1]
    assert without_seconds(final) == without_seconds(answer_dict(served.asker.ask(questions[1])))
    first = events[0][1]
    assert [p["id"] for p in first["passages"]] == [p["id"] for p in final["passages"]]
    assert [p["posterior"] for p in first["passages"]] == [p["prior"] for p in final["passages"]]
    tokens = [data for name, data in events if name == "token"]
    assert [t["token_id"] for t in tokens] == final["token_ids"]
    assert "".join(t["delta"] for t in tokens) == final["answer"]
    for token, evidence in zip(tokens, final["tokens"], strict=True):  # p(z_i|x,y_<=i), Figure 2
        assert token["token"] == evidence["token"] and token["posterior"] == evidence["posterior"]
        assert sum(token["running_posterior"]) == pytest.approx(1.0, abs=1e-4)
    np.testing.assert_allclose(tokens[-1]["running_posterior"], [p["posterior"] for p in final["passages"]],
                               atol=1e-5)  # fmt: skip


def test_beam_search_and_rag_sequence_stream_their_tokens_after_decoding(served, world_model):
    _, questions = world_model
    app = create_app(served)
    settings = [{"kind": "sequence", "beams": 3}, {"kind": "token", "beams": 3}]

    async def fn(client):
        return [await client.post("/v1/answer", json={"question": questions[1], "stream": True, **extra})
                for extra in settings]  # fmt: skip

    for extra, response in zip(settings, call(app, fn), strict=True):
        events = sse_events(response.text)
        final = events[-1][1]
        want = served.asker.with_settings(kind=extra["kind"], config=dataclasses.replace(
            served.asker.config, num_beams=3)).ask(questions[1])  # fmt: skip
        assert without_seconds(final) == without_seconds(answer_dict(want))
        tokens = [data for name, data in events if name == "token"]
        assert [t["token_id"] for t in tokens] == want.token_ids and "".join(t["delta"] for t in tokens) == want.answer
        assert all(t["running_posterior"] is None for t in tokens)
        assert [t["posterior"] for t in tokens] == ([t.posterior for t in want.tokens] or [None] * len(tokens))


def test_concurrent_requests_are_batched_and_answered_as_alone(served, world_model):
    """Six concurrent questions inside one batching window: one retrieval and one decoding for them
    all, and each answer equals the answer to that question asked alone."""
    _, questions = world_model
    app = create_app(served, ServerConfig(max_batch=8, batch_window_ms=500))
    mixed = questions[:6]

    async def fn(client):
        together = await asyncio.gather(*(client.post("/v1/answer", json={"question": q, "stream": i % 2 == 1})
                                          for i, q in enumerate(mixed)))  # fmt: skip
        stats = (await client.get("/healthz")).json()["engine"]
        return together, stats

    together, stats = call(app, fn)
    assert stats["largest_batch"] == 6 and stats["batches"] == 1
    alone = [served.asker.ask(q) for q in mixed]
    for i, (response, want) in enumerate(zip(together, alone, strict=True)):
        got = sse_events(response.text)[-1][1] if i % 2 else response.json()
        assert got["token_ids"] == want.token_ids and got["answer"] == want.answer
        assert [p["id"] for p in got["passages"]] == [p.id for p in want.passages]
        np.testing.assert_allclose([p["posterior"] for p in got["passages"]], [p.posterior for p in want.passages],
                                   atol=1e-5)  # fmt: skip
        np.testing.assert_allclose([t["posterior"] for t in got["tokens"]], [t.posterior for t in want.tokens],
                                   atol=1e-5)  # fmt: skip
    assert len({tuple(a.token_ids) for a in alone}) > 1  # different questions, different answers


def test_bad_requests_get_clear_4xx_json_errors(served, world_model):
    _, questions = world_model
    app = create_app(served, ServerConfig(max_body_bytes=8192))
    too_big = {"question": "x" * 10_000}

    async def chunks():
        for _ in range(9):
            yield b" " * 1000

    async def fn(client):
        post = client.post
        return {
            "missing": await post("/v1/answer", json={}),
            "blank": await post("/v1/answer", json={"question": "   "}),
            "k0": await post("/v1/answer", json={"question": questions[0], "k": 0}),
            "k_over": await post("/v1/answer", json={"question": questions[0], "k": 100}),
            "kind": await post("/v1/answer", json={"question": questions[0], "kind": "magic"}),
            "unknown": await post("/v1/answer", json={"question": questions[0], "temperature": 0.5}),
            "not_json": await post("/v1/answer", content=b"{question", headers={"content-type": "application/json"}),
            "long": await post("/v1/answer", json={"question": "x" * 5000}),
            "big": await post("/v1/answer", json=too_big),
            "big_chunked": await post("/v1/answer", content=chunks()),
            "search_k": await post("/v1/search", json={"query": questions[0], "k": 10_000}),
            "no_user": await post("/v1/chat/completions", json={"messages": [{"role": "system", "content": "x"}]}),
            "n2": await post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "q"}], "n": 2}),
            "path": await client.get("/v1/nothing"),
            "method": await client.get("/v1/answer"),
        }

    out = call(app, fn)
    expected = {"missing": 422, "blank": 422, "k0": 422, "k_over": 422, "kind": 422, "unknown": 422, "not_json": 422,
                "long": 422, "big": 413, "big_chunked": 413, "search_k": 422, "no_user": 422, "n2": 422,
                "path": 404, "method": 405}  # fmt: skip
    assert {name: r.status_code for name, r in out.items()} == expected
    for name, response in out.items():
        error = response.json()["error"]
        assert error["message"] and error["type"], name
        assert "Traceback" not in response.text
    assert "question" in out["missing"].json()["error"]["message"]
    assert "exceeds the 64 passages" in out["k_over"].json()["error"]["message"]
    assert "8192 bytes" in out["big"].json()["error"]["message"]


def test_api_key_protects_the_api_but_not_the_page(served):
    app = create_app(served, ServerConfig(api_key="s3cret"))

    async def fn(client):
        body = {"query": "mynbiq", "k": 2}
        return {
            "none": await client.post("/v1/search", json=body),
            "wrong": await client.post("/v1/search", json=body, headers={"Authorization": "Bearer nope"}),
            "right": await client.post("/v1/search", json=body, headers={"Authorization": "Bearer s3cret"}),
            "models": await client.get("/v1/models"),
            "page": await client.get("/"),
            "health": await client.get("/healthz"),
            "health_key": await client.get("/healthz", headers={"Authorization": "Bearer s3cret"}),
        }

    out = call(app, fn)
    assert [out[n].status_code for n in ("none", "wrong", "right", "models", "page")] == [401, 401, 200, 401, 200]
    assert out["none"].json()["error"]["type"] == "authentication_error"
    assert out["health"].json() == {"status": "ready", "error": None}  # no details without the key
    assert out["health_key"].json()["knowledge_base"]["passages"] == 64


def test_health_page_models_and_openapi(served, world_model):
    rag_config, _ = world_model
    app = create_app(served, ServerConfig(model_name="world"))

    async def fn(client):
        return [await client.get(path) for path in ("/healthz", "/", "/v1/models", "/openapi.json")]

    health, page, models, openapi = call(app, fn)
    body = health.json()
    assert health.status_code == 200 and body["status"] == "ready"
    assert body["model"]["kind"] == "token" and body["model"]["k"] == K and body["model"]["name"] == "world"
    kb = body["knowledge_base"]
    assert kb["path"] == rag_config.index_dir and kb["manifest"]["format"] == "rag-knowledge-base"
    assert kb["manifest"]["passages"] == kb["passages"] == 64
    assert body["engine"]["max_queue"] == 256
    assert page.status_code == 200 and 'id="heatmap"' in page.text
    assert "http://" not in page.text.replace("http://www.w3.org", "")  # nothing fetched from elsewhere
    assert models.json()["data"][0]["id"] == "world"
    paths = openapi.json()["paths"]
    assert {"/v1/answer", "/v1/search", "/v1/chat/completions", "/v1/models", "/healthz"} <= set(paths)
    schemas = openapi.json()["components"]["schemas"]
    assert set(schemas["Answer"]["properties"]) == {f.name for f in dataclasses.fields(Answer)}
    assert "rag" in schemas["ChatCompletion"]["properties"]


def test_full_queue_is_503_and_a_timeout_is_504_and_stops_the_work(served, world_model):
    """The worker is held inside retrieval (the retriever's lock, which /v1/search shares), so what
    queues behind it is deterministic."""
    _, questions = world_model
    app = create_app(served, ServerConfig(max_batch=1, max_queue=1, timeout_s=1.0))

    async def fn(client):
        engine = app.state.rag.engine
        lock = engine.asker.model.retriever.lock
        lock.acquire()
        try:
            running = asyncio.create_task(client.post("/v1/answer", json={"question": questions[0]}))
            while engine.in_flight < 1 or engine.queued:  # taken by the worker, which waits for the lock
                await asyncio.sleep(0.01)
            queued = asyncio.create_task(client.post("/v1/answer", json={"question": questions[1]}))
            while engine.queued < 1:
                await asyncio.sleep(0.01)
            full = await client.post("/v1/answer", json={"question": questions[2]})
            timed_out = await asyncio.gather(running, queued)
        finally:
            lock.release()
        engine.close()  # the worker finishes: the timed-out jobs were dropped, not answered
        return full, timed_out, engine.stats

    full, timed_out, stats = call(app, fn)
    assert full.status_code == 503 and full.headers["retry-after"] == "1"
    assert full.json()["error"]["type"] == "server_busy"
    assert [r.status_code for r in timed_out] == [504, 504]
    assert all(r.json()["error"]["type"] == "timeout" for r in timed_out)
    assert stats.answered == 0


def test_requests_while_loading_get_503_then_the_answer(served, world_model):
    _, questions = world_model
    loaded = []

    def load() -> Served:
        while not loaded:  # until the test has seen "loading"
            time.sleep(0.01)
        return served

    app = create_app(load)

    async def fn(client):
        health = await client.get("/healthz")
        early = await client.post("/v1/answer", json={"question": questions[0]})
        loaded.append(True)
        while (await client.get("/healthz")).status_code != 200:
            await asyncio.sleep(0.02)
        return health, early, await client.post("/v1/answer", json={"question": questions[0]})

    health, early, late = call(app, fn)
    assert health.status_code == 503 and health.json()["status"] == "loading"
    assert early.status_code == 503 and early.json()["error"]["type"] == "loading"
    assert late.status_code == 200


def test_rag_serve_refuses_bad_flags_before_loading_anything(capsys, tmp_path):
    from rag.cli import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cases = {
            "reachable from other machines: give --api-key": ["--host", "0.0.0.0"],
            f"cannot listen on 127.0.0.1:{port}": ["--port", str(port)],
            "--max-batch: must be >= 1": ["--max-batch", "0"],
            "no meta.json": ["--index", str(tmp_path)],
            "--beams: must be >= 1": ["--beams", "0"],
            "--min-new-tokens must be in 0..--max-new-tokens": ["--max-new-tokens", "2", "--min-new-tokens", "3"],
        }
        for message, flags in cases.items():
            assert main(["serve", *flags]) == 2, flags
            assert message in capsys.readouterr().err, flags


# ---------------------------------------------------------------- a live uvicorn process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(base: str, process: subprocess.Popen, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the server exited with {process.returncode}: {process.stdout.read()[-3000:]}")
        try:
            if httpx.get(f"{base}/healthz", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError("the server did not become ready")


def start(command: list[str]) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    return subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def live(world_model, tmp_path_factory):
    """(base URL, process): the world's model under uvicorn on a free loopback port."""
    rag_config, _ = world_model
    config = tmp_path_factory.mktemp("live") / "rag_config.json"
    save_json(rag_config, config)
    port = free_port()
    process = start([sys.executable, "tests/serve_launcher.py", str(config), str(port)])
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, process)
        yield base, process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            process.wait(timeout=60)


def test_the_openai_client_against_the_live_server(live, served, world_model):
    from openai import OpenAI

    base, _ = live
    _, questions = world_model
    client = OpenAI(base_url=f"{base}/v1", api_key="unused", max_retries=0)
    assert [m.id for m in client.models.list()] == ["rag"]
    want = served.asker.ask(questions[2])

    reply = client.chat.completions.create(model="rag", messages=[{"role": "user", "content": questions[2]}])
    assert reply.choices[0].message.content == want.answer and reply.choices[0].finish_reason == "stop"
    rag = reply.model_extra["rag"]  # the documented extra field: the /v1/answer object
    assert without_seconds(rag) == without_seconds(answer_dict(want))
    ChatCompletion.model_validate(reply.model_dump())

    chunks = list(client.chat.completions.create(
        model="rag", stream=True, extra_body={"rag": {"k": 2}},
        messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": questions[3]}]))  # fmt: skip
    alone = served.asker.with_settings(k=2).ask(questions[3])
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == alone.answer
    assert chunks[0].choices[0].delta.role == "assistant" and len(chunks[0].model_extra["rag"]["passages"]) == 2
    token_chunks = [c.model_extra["rag"]["token"] for c in chunks if (c.model_extra.get("rag") or {}).get("token")]
    assert [t["token_id"] for t in token_chunks] == alone.token_ids
    assert all(len(t["posterior"]) == 2 for t in token_chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert chunks[-1].model_extra["rag"]["token_ids"] == alone.token_ids


def _browser(profile: str):
    from playwright.sync_api import sync_playwright

    playwright = sync_playwright().start()
    context = playwright.chromium.launch_persistent_context(
        profile, executable_path=CHROMIUM, args=CHROMIUM_FLAGS, headless=True, viewport={"width": 1200, "height": 1000}
    )
    return playwright, context


def ask_in_browser(base: str, question: str, screenshot: Path) -> dict:
    """Ask on the page in headless Chromium; the answer, the heatmap's shape and its cells."""
    with tempfile.TemporaryDirectory() as profile:
        playwright, context = _browser(profile)
        try:
            page = context.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.on("requestfailed", lambda request: errors.append(request.url))
            page.goto(f"{base}/")
            page.fill("#question", question)
            page.click("#ask")
            page.wait_for_selector("body[data-state=done]", timeout=600_000)
            screenshot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(screenshot), full_page=True)
            rows = page.locator("#heatmap tr.passage-row")
            return {
                "answer": page.inner_text("#answer"),
                "rows": rows.count(),
                "cells": [rows.nth(i).locator("td.cell").count() for i in range(rows.count())],
                "columns": page.locator("#heatmap th.token").count(),
                "bars": page.locator("#passages .bar.posterior").count(),
                "errors": errors,
            }
        finally:
            context.close()
            playwright.stop()


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it where apt is available)")
def test_the_page_streams_the_answer_with_its_heatmap(live, served, world_model, tmp_path):
    base, _ = live
    _, questions = world_model
    shown = ask_in_browser(base, questions[4], tmp_path / "page.png")
    want = served.asker.ask(questions[4])
    assert shown["errors"] == [] and shown["answer"] == want.answer
    assert shown["rows"] == K and shown["cells"] == [len(want.tokens)] * K and shown["columns"] == len(want.tokens)
    assert shown["bars"] == K and (tmp_path / "page.png").stat().st_size > 10_000


def test_graceful_shutdown_finishes_the_requests_in_flight(live, world_model):
    """SIGTERM with requests queued: each still gets its whole answer, then the process exits 0.
    (Last in this file: it ends the live server the tests above share.)"""
    base, process = live
    _, questions = world_model
    body = {"kind": "sequence", "beams": 16, "k": 8, "max_new_tokens": 64}

    async def main():
        async with httpx.AsyncClient(base_url=base, timeout=120) as client:
            requests = [asyncio.create_task(client.post("/v1/answer", json={"question": q, **body}))
                        for q in questions * 3]  # fmt: skip
            in_flight, deadline = 0, time.monotonic() + 60
            while in_flight < 4 and time.monotonic() < deadline:
                in_flight = (await client.get("/healthz")).json()["engine"]["in_flight"]
                await asyncio.sleep(0.005)
            process.send_signal(signal.SIGTERM)
            return in_flight, await asyncio.gather(*requests, return_exceptions=True)

    in_flight, responses = asyncio.run(main())
    assert in_flight >= 4
    assert [getattr(r, "status_code", r) for r in responses] == [200] * len(questions) * 3
    assert all(r.json()["answer"] and r.json()["kind"] == "sequence" for r in responses)
    assert process.wait(timeout=60) == 0
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{base}/healthz", timeout=2)


# ---------------------------------------------------------------- the real default model


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it where apt is available)")
def test_rag_serve_answers_the_angola_question_on_the_page():
    """`rag serve` with every default; the page asks the Angola question. Screenshot: bench/out/serve-page.png."""
    port = free_port()
    process = start([sys.executable, "-m", "rag.cli", "serve", "--port", str(port), "--threads", "1"])
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, process, seconds=1800)
        question = "What is the capital of Angola?"
        api = httpx.post(f"{base}/v1/answer", json={"question": question}, timeout=600).json()
        shown = ask_in_browser(base, question, ROOT / "bench" / "out" / "serve-page.png")
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=120) == 0
    assert shown["errors"] == [] and shown["answer"] == api["answer"] and api["answer"]
    assert shown["rows"] == api["k"] == 5 and shown["cells"] == [len(api["tokens"])] * 5
    assert {p["title"] for p in api["passages"][:2]} & {"Angola", "Luanda"}
    assert sum(p["posterior"] for p in api["passages"]) == pytest.approx(1.0, abs=1e-4)
