"""`rag serve` under load, on loopback only, bounded in time: the issue's targets in one run.

    python bench/bench_serve.py                  # the defaults (about 6 minutes)
    python bench/bench_serve.py --quick          # a smoke run: shorter phases, fewer clients

The server is `rag serve` itself (a subprocess, every model default, --threads 1: the other core runs
the clients), started twice in one run: with micro-batching (--max-batch 8) for every phase, then one
request at a time (--max-batch 1) for the side-by-side throughput phase.

Phases on the batching server:
1. /v1/search on the warm idle server: p50 / p99 of 200 sequential requests.
2. time to first streamed token: one client, /v1/answer with stream, 10 distinct questions; from the
   request to its first `token` event (the first generated token; the `passages` event comes before).
3. throughput, 8 concurrent clients (each: ask, wait, ask again), --phase-seconds; the same phase on
   the one-at-a-time server gives the ratio.
4. 50 concurrent clients for 60 s: half ask /v1/answer, half stream /v1/chat/completions; no new
   request after 60 s, then every one in flight must finish. An error is a non-200 status or a
   malformed reply; a lost request is one sent that never got its whole reply (no answer object, no
   [DONE]).
5. the server's memory after phase 4 vs just before it (the warm server, after phases 1-3), each read
   once the server is idle: its heap (anonymous resident memory) decides, since the resident size also
   counts pages of the memory-mapped knowledge base, which come and go with the page cache (other
   processes' memory pressure evicts them); both are printed.
Then, in this process with the servers stopped, where the time of an answer goes: retrieval, the
generator's prefill of the k prompts, the decoding steps, for 8 questions one at a time and as one
batch (wall and CPU seconds), which bounds what batching can gain on this CPU.
The questions are general-knowledge questions written here (never a test set), spread over the
clients so that concurrent requests ask different questions.
Prints a table; writes bench/out/bench_serve.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rag.io import atomic_write_text  # noqa: E402

QUESTIONS = [
    "What is the capital of Angola?", "Who wrote the tragedy Hamlet?", "What is the highest mountain on Earth?",
    "Who painted the Mona Lisa?", "What is the largest planet in the Solar System?", "Who discovered penicillin?",
    "What is the capital of Australia?", "Who developed the theory of general relativity?",
    "What is the longest river in Africa?", "In which country is the city of Kyoto?",
    "Who was the first president of the United States?", "What is the chemical symbol for gold?",
    "Which ocean lies between Africa and Australia?", "Who composed the Fifth Symphony?",
    "What is the capital of Canada?", "Which planet is known as the Red Planet?",
    "Who wrote the novel War and Peace?", "What is the largest desert in the world?",
    "What language is spoken in Brazil?", "Who invented the telephone?", "What is the capital of Kenya?",
    "Which element has the atomic number 1?", "Who painted The Starry Night?", "What is the capital of Peru?",
    "Which country has the largest population?", "Who wrote Pride and Prejudice?",
    "What is the smallest country in the world?", "What is the capital of Norway?",
    "Who was the first person to walk on the Moon?", "What is the currency of Japan?",
    "Which river flows through Baghdad?", "Who founded the Mongol Empire?", "What is the capital of Egypt?",
    "Which mountain range separates Europe and Asia?", "Who wrote the Odyssey?", "What is the capital of Chile?",
    "Which sea is the saltiest?", "Who discovered the electron?", "What is the capital of Vietnam?",
    "Which animal is the largest mammal?", "Who wrote Don Quixote?", "What is the capital of Turkey?",
    "Which country is home to the kangaroo?", "Who painted the Sistine Chapel ceiling?",
    "What is the capital of Argentina?", "Which gas do plants absorb from the air?",
    "Who wrote One Hundred Years of Solitude?", "What is the capital of Ethiopia?",
]  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    process: subprocess.Popen
    base: str
    log: Path

    @classmethod
    def start(cls, max_batch: int, out: Path) -> Server:
        port = free_port()
        log = out / f"bench_serve.server-batch{max_batch}.log"
        env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
        command = [sys.executable, "-m", "rag.cli", "serve", "--port", str(port), "--threads", "1",
                   "--max-batch", str(max_batch), "--max-queue", "512", "--timeout", "600", "--log-level", "warning"]
        process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
        server = cls(process, f"http://127.0.0.1:{port}", log)
        deadline = time.monotonic() + 1800  # the first run may build the index and convert the generator
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise SystemExit(f"rag serve exited with {process.returncode}; see {log}")
            try:
                if httpx.get(f"{server.base}/healthz", timeout=2).status_code == 200:
                    return server
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        raise SystemExit("rag serve did not become ready")

    def rss_mb(self) -> float:
        return psutil.Process(self.process.pid).memory_info().rss / 2**20

    def anon_mb(self) -> float:
        """The anonymous part of the resident memory (heap, not the memory-mapped knowledge base)."""
        status = Path(f"/proc/{self.process.pid}/status").read_text().splitlines()
        return next(int(line.split()[1]) for line in status if line.startswith("RssAnon")) / 1024

    def settled_memory(self, seconds: float = 20.0) -> tuple[float, float]:
        """(RSS, heap) MiB once the server is idle: no request in flight, and the engine has returned
        the last batch's memory (a client has its answer a moment before that)."""
        deadline = time.monotonic() + seconds
        while self.health()["engine"]["in_flight"] and time.monotonic() < deadline:
            time.sleep(0.2)
        previous = (self.rss_mb(), self.anon_mb())
        while time.monotonic() < deadline:
            time.sleep(1.0)
            now = (self.rss_mb(), self.anon_mb())
            if abs(now[0] - previous[0]) <= 0.005 * previous[0]:
                return now
            previous = now
        return previous

    def cpu_s(self) -> float:
        times = psutil.Process(self.process.pid).cpu_times()
        return times.user + times.system

    def health(self) -> dict[str, Any]:
        return httpx.get(f"{self.base}/healthz", timeout=30).json()

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=600)


@dataclass
class Tally:
    latencies: dict[str, list[float]] = field(default_factory=lambda: {"answer": [], "chat-stream": []})
    sent: int = 0
    ok: int = 0
    errors: list[str] = field(default_factory=list)
    lost: int = 0

    def summary(self) -> dict[str, Any]:
        every = sorted(x for values in self.latencies.values() for x in values)
        out = {"sent": self.sent, "ok": self.ok, "errors": len(self.errors), "lost": self.lost,
               "error_samples": self.errors[:5], "p50_s": percentile(every, 50), "p99_s": percentile(every, 99)}  # fmt: skip
        for kind, values in self.latencies.items():
            out[f"{kind}_n"] = len(values)
            out[f"{kind}_p50_s"], out[f"{kind}_p99_s"] = percentile(sorted(values), 50), percentile(sorted(values), 99)
        return out


def percentile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    index = min(len(sorted_values) - 1, max(0, round(q / 100 * (len(sorted_values) - 1))))
    return sorted_values[index]


async def ask_answer(client: httpx.AsyncClient, question: str) -> str | None:
    """/v1/answer; None when the reply is whole, else what went wrong."""
    response = await client.post("/v1/answer", json={"question": question})
    if response.status_code != 200:
        return f"/v1/answer {response.status_code}: {response.text[:200]}"
    data = response.json()
    return None if "answer" in data and data["passages"] else f"/v1/answer: malformed reply {response.text[:200]}"


async def ask_chat_stream(client: httpx.AsyncClient, question: str) -> str | None:
    body = {"model": "rag", "stream": True, "messages": [{"role": "user", "content": question}]}
    done, finished, text = False, None, ""
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            return f"chat {response.status_code}: {(await response.aread())[:200]!r}"
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return f"chat stream error: {chunk['error']}"
            choice = chunk["choices"][0]
            text += choice["delta"].get("content") or ""
            if choice["finish_reason"]:
                finished = chunk["rag"]["answer"]
    if not done or finished is None or finished != text:
        return f"chat stream incomplete: done={done} answer={finished!r} text={text!r}"
    return None


async def clients(base: str, n: int, seconds: float, mix: bool, offset: int = 0) -> tuple[Tally, float]:
    """n clients, each asking again as soon as it has its reply, for `seconds`; then the ones in flight
    finish. Returns the tally and the wall time until the last reply."""
    tally = Tally()
    stop_at = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=n + 4, max_keepalive_connections=n + 4)

    async def one(c: int, client: httpx.AsyncClient) -> None:
        i = 0
        while time.monotonic() < stop_at:
            question = QUESTIONS[(offset + c * 7 + i * 13) % len(QUESTIONS)]
            kind = "chat-stream" if mix and c % 2 else "answer"
            tally.sent += 1
            start = time.monotonic()
            try:
                problem = await (ask_chat_stream if kind == "chat-stream" else ask_answer)(client, question)
            except (httpx.HTTPError, json.JSONDecodeError, KeyError) as error:
                tally.lost += 1
                tally.errors.append(f"{kind}: {type(error).__name__}: {error}")
                i += 1
                continue
            if problem is None:
                tally.ok += 1
                tally.latencies[kind].append(time.monotonic() - start)
            else:
                tally.errors.append(problem)
            i += 1

    start = time.monotonic()
    async with httpx.AsyncClient(base_url=base, timeout=900, limits=limits) as client:
        await asyncio.gather(*(one(c, client) for c in range(n)))
    return tally, time.monotonic() - start


def search_latency(server: Server, n: int) -> dict[str, Any]:
    times = []
    cpu_before = server.cpu_s()
    with httpx.Client(base_url=server.base, timeout=60) as client:
        for i in range(n):
            start = time.perf_counter()
            response = client.post("/v1/search", json={"query": QUESTIONS[i % len(QUESTIONS)], "k": 5})
            times.append(time.perf_counter() - start)
            assert response.status_code == 200 and len(response.json()["hits"]) == 5
    cpu = server.cpu_s() - cpu_before
    times.sort()
    return {"n": n, "p50_ms": 1000 * percentile(times, 50), "p99_ms": 1000 * percentile(times, 99),
            "server_cpu_ms_per_request": 1000 * cpu / n}  # fmt: skip


def first_token_latency(base: str, questions: list[str]) -> dict[str, Any]:
    firsts, passages, totals = [], [], []
    with httpx.Client(base_url=base, timeout=600) as client:
        for question in questions:
            start = time.perf_counter()
            first = seen_passages = None
            with client.stream("POST", "/v1/answer", json={"question": question, "stream": True}) as response:
                assert response.status_code == 200
                for line in response.iter_lines():
                    if line == "event: passages" and seen_passages is None:
                        seen_passages = time.perf_counter() - start
                    if line == "event: token" and first is None:
                        first = time.perf_counter() - start
            totals.append(time.perf_counter() - start)
            firsts.append(first)
            passages.append(seen_passages)
    return {"n": len(questions), "first_token_p50_s": statistics.median(firsts), "first_token_max_s": max(firsts),
            "first_token_s": firsts, "passages_event_p50_s": statistics.median(passages),
            "whole_answer_p50_s": statistics.median(totals)}  # fmt: skip


def throughput_rounds(batching: Server, single: Server, rounds: int, seconds: float) -> dict[str, Any]:
    """8 clients on the batching server, then on the one-at-a-time server, `rounds` times (so that the
    load other processes put on the CPU falls on both): answers per wall second (the drain of the
    requests in flight included) and per CPU second of the server."""
    totals: dict[str, dict[str, float]] = {name: {"ok": 0, "wall_s": 0.0, "cpu_s": 0.0, "errors": 0}
                                           for name in ("batching", "single")}  # fmt: skip
    per_round = []
    for r in range(rounds):
        row = {}
        for name, server in (("batching", batching), ("single", single)):
            print(f"8 clients, {name}, round {r + 1}/{rounds}, {seconds:.0f} s ...", flush=True)
            cpu = server.cpu_s()
            tally, wall = asyncio.run(clients(server.base, 8, seconds, mix=False, offset=1 + 8 * r))
            cpu = server.cpu_s() - cpu
            for key, value in (("ok", tally.ok), ("wall_s", wall), ("cpu_s", cpu), ("errors", len(tally.errors))):
                totals[name][key] += value
            row[name] = {"answered": tally.ok, "wall_s": wall, "cpu_s": cpu, "answers_per_s": tally.ok / wall}
        row["ratio_wall"] = row["batching"]["answers_per_s"] / row["single"]["answers_per_s"]
        per_round.append(row)
    rate = {name: t["ok"] / t["wall_s"] for name, t in totals.items()}
    per_cpu = {name: t["ok"] / t["cpu_s"] for name, t in totals.items()}
    return {"rounds": per_round, "totals": totals, "answers_per_s": rate, "answers_per_cpu_s": per_cpu,
            "speedup_wall": rate["batching"] / rate["single"],
            "speedup_cpu": per_cpu["batching"] / per_cpu["single"]}  # fmt: skip


def where_the_time_goes(questions: list[str]) -> dict[str, Any]:
    """The default model in this process: retrieval, prefill (the generator's pass over the k prompts)
    and decoding, one question at a time and as one batch; wall and this thread's CPU seconds."""
    import torch

    from rag.answering import Asker, rag_model_config
    from rag.config import DecodingConfig

    torch.set_num_threads(1)
    asker = Asker.load(rag_model_config(), DecodingConfig(num_beams=1))
    model, gen = asker.model, asker.model.generator
    asker.ask_many(questions[:2])

    def timed(fn: Any) -> tuple[Any, float, float]:
        wall, cpu = time.perf_counter(), time.thread_time()
        out = fn()
        return out, time.perf_counter() - wall, time.thread_time() - cpu

    def parts(batch: list[str]) -> dict[str, float]:
        retrieved, retrieve_s, retrieve_cpu = timed(lambda: model.retriever.retrieve(batch, model.k))
        passages = [list(zip(t, x, strict=True)) for t, x in zip(retrieved.titles, retrieved.texts, strict=True)]
        with torch.no_grad():
            _, prefill_s, prefill_cpu = timed(lambda: gen.encode_prefix(gen.format_inputs(batch, passages)))
        _, total_s, total_cpu = timed(lambda: asker.ask_many(batch))  # retrieval + prefill + decoding
        return {"retrieve_s": retrieve_s, "prefill_s": prefill_s, "decode_s": total_s - retrieve_s - prefill_s,
                "total_s": total_s, "retrieve_cpu_s": retrieve_cpu, "prefill_cpu_s": prefill_cpu,
                "decode_cpu_s": total_cpu - retrieve_cpu - prefill_cpu, "total_cpu_s": total_cpu}  # fmt: skip

    singles = [parts([q]) for q in questions]
    alone = {key: sum(p[key] for p in singles) for key in singles[0]}
    together = parts(questions)
    return {"questions": len(questions), "one_at_a_time": alone, "one_batch": together,
            "prefill_share_alone": alone["prefill_cpu_s"] / alone["total_cpu_s"],
            "batch_speedup_wall": alone["total_s"] / together["total_s"],
            "batch_speedup_cpu": alone["total_cpu_s"] / together["total_cpu_s"]}  # fmt: skip


def machine_load(servers: tuple[Server, ...] = ()) -> dict[str, Any]:
    """What else runs here (the CPU is shared): load average and the busiest other processes."""
    me = {os.getpid(), *(s.process.pid for s in servers)}
    procs = []
    for p in psutil.process_iter(["pid", "cmdline", "cpu_percent"]):
        if p.info["pid"] in me:
            continue
        procs.append(p)
    time.sleep(1.0)
    busy = []
    for p in procs:
        try:
            cpu = p.cpu_percent(None)
            if cpu >= 20:
                busy.append({"cpu_percent": cpu, "command": " ".join(p.info["cmdline"] or [])[:120]})
        except psutil.Error:
            continue
    return {"loadavg_1m": os.getloadavg()[0], "cpus": os.cpu_count(), "busy_processes": busy}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a smoke run: 10 s phases, 12 clients")
    parser.add_argument("--load-seconds", type=float, default=60.0)
    parser.add_argument("--load-clients", type=int, default=50)
    parser.add_argument("--phase-seconds", type=float, default=30.0, help="each 8-client throughput phase")
    parser.add_argument("--rounds", type=int, default=3, help="throughput rounds (batching, then one at a time)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "out"))
    args = parser.parse_args()
    if args.quick:
        args.load_seconds, args.load_clients, args.phase_seconds, args.rounds = 10.0, 12, 10.0, 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for p in psutil.process_iter():  # prime cpu_percent
        try:
            p.cpu_percent(None)
        except psutil.Error:
            pass
    result: dict[str, Any] = {"machine_before": machine_load()}

    print("starting rag serve twice: --max-batch 8 and --max-batch 1 ...", flush=True)
    server, single = Server.start(8, out), Server.start(1, out)
    result["model"] = server.health()["model"]
    for s in (server, single):
        asyncio.run(clients(s.base, 2, 0.001, mix=True))  # warm-up: one answer, one streamed chat
    warm = server.settled_memory()
    print("search latency ...", flush=True)
    result["search"] = search_latency(server, 200)
    print("time to first token ...", flush=True)
    result["first_token"] = first_token_latency(server.base, QUESTIONS[-10:])
    result["throughput_8"] = throughput_rounds(server, single, args.rounds, args.phase_seconds)
    print(f"{args.load_clients} clients, mixed, {args.load_seconds:.0f} s ...", flush=True)
    before = server.settled_memory()
    result["machine_during_load"] = machine_load((server, single))
    load, load_wall = asyncio.run(clients(server.base, args.load_clients, args.load_seconds, mix=True, offset=2))
    result["load"] = {**load.summary(), "clients": args.load_clients, "seconds": args.load_seconds,
                      "wall_s": load_wall, "answers_per_s": load.ok / load_wall}  # fmt: skip
    after = server.settled_memory()
    result["memory"] = {"rss_warm_mb": warm[0], "rss_before_mb": before[0], "rss_after_mb": after[0],
                        "anon_warm_mb": warm[1], "anon_before_mb": before[1], "anon_after_mb": after[1],
                        "growth": after[0] / before[0] - 1, "heap_growth": after[1] / before[1] - 1,
                        "heap_growth_since_warm": after[1] / warm[1] - 1}  # fmt: skip
    result["engine_batching"] = server.health()["engine"]
    result["engine_single"] = single.health()["engine"]
    result["exit_codes"] = [server.stop(), single.stop()]
    print("where the time goes (in this process) ...", flush=True)
    result["time_split"] = where_the_time_goes(QUESTIONS[8:16])
    result["machine_after"] = machine_load()
    atomic_write_text(out / "bench_serve.json", json.dumps(result, indent=2))
    print_table(result, args)
    return 0


def print_table(r: dict[str, Any], args: argparse.Namespace) -> None:
    load, mem, ft, tp = r["load"], r["memory"], r["first_token"], r["throughput_8"]

    def fmt(x: float | None, unit: str = "s") -> str:
        return "n/a" if x is None else f"{x:.2f} {unit}"

    rows = [
        (f"{args.load_clients} clients for {args.load_seconds:.0f} s, mixed /v1/answer + streamed chat",
         "0 errors, 0 lost; p50 / p99",
         f"{load['ok']} answered of {load['sent']}, {load['errors']} errors, {load['lost']} lost; "
         f"p50 {fmt(load['p50_s'])} / p99 {fmt(load['p99_s'])}",
         "met" if load["errors"] == 0 and load["lost"] == 0 else "MISSED"),
        ("throughput, 8 clients: batching vs one at a time", ">= 2x",
         f"{tp['answers_per_s']['batching']:.3f} vs {tp['answers_per_s']['single']:.3f} answers/s = "
         f"{tp['speedup_wall']:.2f}x ({len(tp['rounds'])} alternating rounds; per server CPU second "
         f"{tp['speedup_cpu']:.2f}x)", "met" if tp["speedup_wall"] >= 2 else "MISSED"),
        ("time to first streamed token, one client, defaults", "<= 0.5 s",
         f"p50 {fmt(ft['first_token_p50_s'])} (max {fmt(ft['first_token_max_s'])}; passages event "
         f"{fmt(ft['passages_event_p50_s'])})", "met" if ft["first_token_p50_s"] <= 0.5 else "MISSED"),
        ("/v1/search p50, warm server", "<= 20 ms",
         f"p50 {r['search']['p50_ms']:.1f} ms (p99 {r['search']['p99_ms']:.1f} ms)",
         "met" if r["search"]["p50_ms"] <= 20 else "MISSED"),
        ("server memory after the load test vs before", "<= +10%",
         f"heap {mem['anon_before_mb']:.0f} -> {mem['anon_after_mb']:.0f} MiB ({100 * mem['heap_growth']:+.1f}%); "
         f"resident {mem['rss_before_mb']:.0f} -> {mem['rss_after_mb']:.0f} MiB ({100 * mem['growth']:+.1f}%)",
         "met" if mem["heap_growth"] <= 0.10 else "MISSED"),
    ]  # fmt: skip
    print()
    print("| measure | target | measured | |")
    print("|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    rounds = ", ".join(f"{row['ratio_wall']:.2f}x ({row['batching']['answered']} vs {row['single']['answered']} answers)"
                       for row in tp["rounds"])  # fmt: skip
    print(f"\nthroughput rounds, batching vs one at a time: {rounds}")
    split = r["time_split"]
    print(f"\nwhere the time goes, {split['questions']} questions (this process, 1 thread; CPU seconds, wall in brackets):")
    for name in ("one_at_a_time", "one_batch"):
        p = split[name]
        print(f"  {name.replace('_', ' ')}: retrieval {p['retrieve_cpu_s']:.2f} ({p['retrieve_s']:.2f}), prefill "
              f"{p['prefill_cpu_s']:.2f} ({p['prefill_s']:.2f}), decoding {p['decode_cpu_s']:.2f} ({p['decode_s']:.2f}), "
              f"total {p['total_cpu_s']:.2f} ({p['total_s']:.2f})")  # fmt: skip
    print(f"  prefill is {100 * split['prefill_share_alone']:.0f}% of a lone question's CPU time; one batch of "
          f"{split['questions']} vs one at a time: {split['batch_speedup_cpu']:.2f}x in CPU time, "
          f"{split['batch_speedup_wall']:.2f}x wall")  # fmt: skip
    alone = split["one_at_a_time"]
    print(f"  CPU time to a lone question's first token (retrieval + prefill; the first token's distribution "
          f"comes with the prefill): {(alone['retrieve_cpu_s'] + alone['prefill_cpu_s']) / split['questions']:.2f} s")
    print(f"/v1/search: {r['search']['server_cpu_ms_per_request']:.1f} ms of server CPU per request")
    print(f"memory since the warm-up (heap): {100 * mem['heap_growth_since_warm']:+.1f}%")
    sizes = r["engine_batching"]["batch_sizes"]
    print(f"\nbatch sizes under load (size: batches): {dict(sorted((int(k), v) for k, v in sizes.items()))}")
    print(f"latency p50 / p99 by kind: /v1/answer {fmt(load['answer_p50_s'])} / {fmt(load['answer_p99_s'])}, "
          f"streamed chat {fmt(load['chat-stream_p50_s'])} / {fmt(load['chat-stream_p99_s'])}")  # fmt: skip
    print(f"model: {r['model']['generator']} ({r['model']['generator_dtype']}), k = {r['model']['k']}, "
          f"{r['model']['decoding']['num_beams']} beam(s), torch threads {r['model']['torch_threads']}")  # fmt: skip
    for name in ("machine_before", "machine_during_load", "machine_after"):
        m = r[name]
        others = "; ".join(f"{p['command']} ({p['cpu_percent']:.0f}%)" for p in m["busy_processes"]) or "nothing busy"
        print(f"CPU ({name}): {m['cpus']} cores, load average {m['loadavg_1m']:.2f}; also running: {others}")
    if any(r[name]["busy_processes"] for name in ("machine_before", "machine_during_load", "machine_after")):
        print("(Other processes were busy on the CPU, as listed: every figure above was measured beside them.)")


if __name__ == "__main__":
    raise SystemExit(main())
