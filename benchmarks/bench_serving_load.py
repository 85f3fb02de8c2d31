"""Serving under open-loop load: Poisson arrivals from many users at rising offered loads, each
request with its own max_new_tokens (8–64) and half of them sampled. Systems, in one run, on the
same arrival schedule per load:

  engine, HTTP          today's `prefixfleet serve` (a subprocess), streamed /v1/completions;
                        time to first token is the first text event
  engine, in-process    the same service called from an event loop in this process
  batcher (8aa5aba)     `prefixfleet serve` of the commit before the engine (a git worktree):
                        its request-level batcher, /v1/generate (no streaming: TTFT = latency)
  PEFT user by user     one PeftModel with every user's adapter, one worker in arrival order

Per load: achieved tokens/s, TTFT and latency p50/p99 (from the scheduled arrival), rows per
decode step (per forward pass for the batcher). Then per system the highest load served with
p99 latency ≤ 2 s, and the ratios the goals name. Correctness: every greedy text of the highest
load each system ran is compared with our one-row generation for that user. A PNG of tokens/s
and p99 against load is written next to this file.

    python benchmarks/bench_serving_load.py [--users 48] [--loads 4,8,16,32,64,128] [--seconds 6]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_serving import peft_model, publish  # noqa: E402
from benchmarks.old_commit import old_package, remove_old_package  # noqa: E402
from prefixfleet.pipelines.serving import GenerateRequest, PrefixService, ServeConfig  # noqa: E402
from prefixfleet.pipelines.serving.service import Busy, settings  # noqa: E402
from prefixfleet.registry import Registry, UserKey  # noqa: E402
from prefixfleet.workers.backbone import load_backbone  # noqa: E402
from prefixfleet.workers.generate import generate  # noqa: E402
from prefixfleet.workers.synthetic import user_id, user_rows  # noqa: E402
from prefixfleet.workers.tiny import build_backbone  # noqa: E402
from tests.fixtures.servers import free_port  # noqa: E402

BATCHER_COMMIT = "8aa5aba"
GOAL_P99_S = 2.0
# Every user here is in one namespace: its line's bound (a fairness policy, 64 by default) would
# turn overload into 429s before latency shows it. The batcher has no bound at all.
UNBOUNDED_QUEUE = ["--max-queue", "4096", "--max-queue-per-namespace", "4096"]


@dataclass(frozen=True)
class Ask:
    at: float  # seconds after the level's start
    user: int
    prompt: str
    max_new_tokens: int
    sampled: bool
    seed: int


@dataclass
class Level:
    system: str
    load: float
    seconds: float = 0.0
    ttft: list[float] = field(default_factory=list)
    latency: list[float] = field(default_factory=list)
    tokens: int = 0
    failed: int = 0
    rows_per_step: float = float("nan")
    texts: dict[int, str] = field(default_factory=dict)  # ask index -> greedy text

    def q(self, values: list[float], quantile: float) -> float:
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, round(quantile * (len(ordered) - 1)))] if ordered else float("nan")

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    @property
    def p99(self) -> float:
        return self.q(self.latency, 0.99) if not self.failed else float("inf")


def schedule(load: float, seconds: float, users: int, seed: int) -> list[Ask]:
    rng, at, out = random.Random(seed), 0.0, []
    while True:
        at += rng.expovariate(load)
        if at > seconds:
            return out
        u = rng.randrange(users)
        out.append(Ask(at, u, user_rows(u, 3)[rng.randrange(3)]["prompt"], rng.randint(8, 64), rng.random() < 0.5,
                       rng.randrange(1 << 30)))


async def open_loop(asks: list[Ask], one) -> float:
    """Start each ask at its time whatever is still running; the seconds until the last ends."""
    start = time.perf_counter()

    async def launch(i: int, ask: Ask) -> None:
        await asyncio.sleep(max(0.0, start + ask.at - time.perf_counter()))
        await one(i, ask, start + ask.at)

    await asyncio.gather(*(launch(i, a) for i, a in enumerate(asks)))
    return time.perf_counter() - start


async def engine_http(url: str, asks: list[Ask], level: Level) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=2000)) as http:
        async def one(i: int, ask: Ask, due: float) -> None:
            body = {"model": user_id(ask.user), "prompt": ask.prompt, "max_tokens": ask.max_new_tokens, "stream": True,
                    "temperature": 0.8 if ask.sampled else 0, "top_p": 0.9, "seed": ask.seed,
                    "stream_options": {"include_usage": True}}
            text, first = [], None
            try:
                async with http.stream("POST", "/v1/completions", json=body) as response:
                    response.raise_for_status()
                    async for line in response.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        event = json.loads(line[6:])
                        if event.get("usage"):
                            level.tokens += event["usage"]["completion_tokens"]
                        for choice in event.get("choices", ()):
                            if choice["text"] and first is None:
                                first = time.perf_counter()
                            text.append(choice["text"])
            except httpx.HTTPError:
                level.failed += 1
                return
            end = time.perf_counter()
            level.ttft.append((first or end) - due)
            level.latency.append(end - due)
            if not ask.sampled:
                level.texts[i] = "".join(text)

        level.seconds = await open_loop(asks, one)


async def batcher_http(url: str, asks: list[Ask], level: Level) -> None:
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=2000)) as http:
        async def one(i: int, ask: Ask, due: float) -> None:
            body = {"user_id": user_id(ask.user), "prompt": ask.prompt, "max_new_tokens": ask.max_new_tokens,
                    "do_sample": ask.sampled, "temperature": 0.8, "top_p": 0.9}
            try:
                response = await http.post("/v1/generate", json=body)
                response.raise_for_status()
            except httpx.HTTPError:
                level.failed += 1
                return
            end = time.perf_counter()
            answer = response.json()
            level.tokens += answer["tokens"]
            level.ttft.append(end - due)
            level.latency.append(end - due)
            if not ask.sampled:
                level.texts[i] = answer["text"]

        level.seconds = await open_loop(asks, one)


async def engine_in_process(service: PrefixService, asks: list[Ask], level: Level) -> None:
    async def one(i: int, ask: Ask, due: float) -> None:
        request = GenerateRequest(user_id=user_id(ask.user), prompt=ask.prompt, max_new_tokens=ask.max_new_tokens,
                                  do_sample=ask.sampled, temperature=0.8, top_p=0.9, seed=ask.seed)
        submitted = time.perf_counter()
        try:
            choices = await service.submit(UserKey("default", request.user_id), [request.prompt], settings(request))
        except Busy:
            level.failed += 1
            return
        done, = await service.finished(choices)
        end = time.perf_counter()
        level.tokens += len(done.token_ids)
        level.latency.append(end - due)
        level.ttft.append(submitted - due + done.first_token_s)
        if not ask.sampled:
            level.texts[i] = done.text

    level.seconds = await open_loop(asks, one)


def peft_user_by_user(model, base, asks: list[Ask], level: Level) -> None:
    """One worker in arrival order: set the user's adapter, generate."""
    tok, worker = base.tokenizer, ThreadPoolExecutor(1)

    @torch.no_grad()
    def serve(i: int, ask: Ask, due: float) -> None:
        model.set_adapter(f"u{ask.user}")
        enc = tok(ask.prompt, return_tensors="pt", add_special_tokens=False)
        out = model.generate(input_ids=enc.input_ids, attention_mask=enc.attention_mask, do_sample=ask.sampled,
                             temperature=0.8 if ask.sampled else None, top_p=0.9 if ask.sampled else None,
                             max_new_tokens=ask.max_new_tokens, pad_token_id=tok.pad_token_id)
        ids = out[0, enc.input_ids.shape[1]:].tolist()
        ids = ids[: ids.index(tok.eos_token_id) + 1] if tok.eos_token_id in ids else ids
        end = time.perf_counter()
        level.tokens += len(ids)
        level.latency.append(end - due)
        level.ttft.append(end - due)
        if not ask.sampled:
            level.texts[i] = tok.decode(ids, skip_special_tokens=True)

    start, pending = time.perf_counter(), []
    for i, ask in enumerate(asks):
        time.sleep(max(0.0, start + ask.at - time.perf_counter()))
        pending.append(worker.submit(serve, i, ask, start + ask.at))
    for future in pending:
        future.result()
    level.seconds = time.perf_counter() - start
    worker.shutdown()


def start_server(cmd: list[str], env: dict[str, str], port: int, log: Path) -> subprocess.Popen:
    process = subprocess.Popen(cmd, env=os.environ | env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"server did not start; see {log}:\n{log.read_text()[-2000:]}")
        time.sleep(0.2)


def step_counts(url: str, old: bool) -> tuple[float, float]:
    """(steps, rows summed over steps) so far; for the batcher (forward passes, None)."""
    if old:
        return httpx.get(f"{url}/healthz", timeout=10).json()["batches"], 0.0
    samples = {}
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith(("prefixfleet_decode_steps_total", "prefixfleet_decode_rows_total")):
            name, value = line.split()
            samples[name] = float(value)
    return samples["prefixfleet_decode_steps_total"], samples["prefixfleet_decode_rows_total"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=48)
    parser.add_argument("--loads", default="4,8,16,32,64,128", help="offered loads, requests/s")
    parser.add_argument("--seconds", type=float, default=6.0, help="arrivals per load level")
    parser.add_argument("--plot", default=str(ROOT / "benchmarks" / "serving_load.png"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    loads = [float(x) for x in args.loads.split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        backbone_dir = str(build_backbone(root / "backbone", "gpt2"))
        backbone = load_backbone(backbone_dir)
        home = root / "home"
        registry = Registry.from_env(home)
        adapters, prefixes = publish(registry, backbone, args.users, root / "adapters")
        plans = {load: schedule(load, args.seconds, args.users, seed=int(load * 10)) for load in loads}
        warm_up = schedule(8, 2, args.users, seed=1)  # unrecorded: first connections, prefix cache misses
        print(f"# {platform.machine()}, {os.cpu_count()} CPUs, torch threads 1; tiny gpt2, {args.users} users, "
              f"prefix of 8 tokens; Poisson arrivals for {args.seconds:g} s per load; max_new_tokens 8-64; "
              "half sampled", flush=True)
        levels: list[Level] = []
        env = {"PREFIXFLEET_HOME": str(home), "OMP_NUM_THREADS": "1"}
        shim = old_package(root, BATCHER_COMMIT)
        try:
            for system, extra, old in (("engine, HTTP", {}, False),
                                       (f"batcher ({BATCHER_COMMIT})", {"PYTHONPATH": str(shim)}, True)):
                port = free_port()
                cmd = [sys.executable, "-c", "from prefixfleet.pipelines.cli import main; main()", "serve",
                       "--backbone", backbone_dir, "--port", str(port), *([] if old else UNBOUNDED_QUEUE)]
                server = start_server(cmd, env | extra, port, root / f"{port}.log")
                url = f"http://127.0.0.1:{port}"
                try:
                    asyncio.run((batcher_http if old else engine_http)(url, warm_up, Level(system, 0)))

                    def over_http(level: Level, asks: list[Ask], url: str = url, old: bool = old) -> None:
                        before = step_counts(url, old)
                        asyncio.run((batcher_http if old else engine_http)(url, asks, level))
                        after = step_counts(url, old)
                        rows = len(asks) if old else after[1] - before[1]
                        level.rows_per_step = rows / max(1.0, after[0] - before[0])

                    levels += rising(system, loads, plans, over_http)
                finally:
                    server.terminate()
                    server.wait(timeout=60)
        finally:
            remove_old_package(root)

        service = PrefixService(backbone, registry, ServeConfig(max_queue=4096, max_queue_per_tenant=4096))
        try:
            asyncio.run(engine_in_process(service, warm_up, Level("warm-up", 0)))
            levels += rising("engine, in-process", loads, plans,
                             lambda level, asks: asyncio.run(engine_in_process(service, asks, level)))
        finally:
            service.close()

        peft, base = peft_model(backbone_dir, adapters)
        peft_user_by_user(peft, base, warm_up, Level("warm-up", 0))
        levels += rising("PEFT user by user", loads, plans,
                         lambda level, asks: peft_user_by_user(peft, base, asks, level))
        summary(levels, plans, backbone, prefixes)
        plot(levels, Path(args.plot))
        registry.close()


def rising(system: str, loads: list[float], plans: dict[float, list[Ask]],
           run: Callable[[Level, list[Ask]], None]) -> list[Level]:
    """`run` at each load in turn, reported as it ends, until p99 is far past the goal."""
    out = []
    for load in loads:
        level = Level(system, load)
        run(level, plans[load])
        out.append(level)
        report(level)
        if level.p99 > 4 * GOAL_P99_S:
            break
    return out


def report(level: Level) -> None:
    print(f"| {level.system} | {level.load:g} | {level.tokens_per_s:,.0f} | {1000 * level.q(level.ttft, 0.5):,.0f} "
          f"| {1000 * level.q(level.ttft, 0.99):,.0f} | {1000 * level.q(level.latency, 0.5):,.0f} "
          f"| {1000 * level.q(level.latency, 0.99):,.0f} | {level.rows_per_step:.1f} | {level.failed} |", flush=True)


def summary(levels: list[Level], plans: dict[float, list[Ask]], backbone, prefixes) -> None:
    systems = list(dict.fromkeys(level.system for level in levels))
    best = {}
    for system in systems:
        ok = [lv for lv in levels if lv.system == system and lv.p99 <= GOAL_P99_S]
        best[system] = max(ok, key=lambda lv: lv.load) if ok else None
    print("\n| system | highest load with p99 ≤ 2 s (req/s) | tokens/s there | greedy texts = ours alone |")
    print("|---|---:|---:|---:|")
    reference: dict[int, str] = {}
    for system in systems:
        top = max((lv for lv in levels if lv.system == system), key=lambda lv: lv.load)
        asks = plans[top.load]
        same = 0
        for i, text in top.texts.items():
            key = id(asks[i])
            if key not in reference:
                ask = asks[i]
                reference[key] = generate(backbone, [prefixes[ask.user]], [ask.prompt],
                                          max_new_tokens=ask.max_new_tokens)[0]
            same += text == reference[key]
        b = best[system]
        print(f"| {system} | {b.load if b else 0:g} | {b.tokens_per_s if b else 0:,.0f} | "
              f"{same}/{len(top.texts)} (at {top.load:g} req/s) |")
    engine, batcher = best.get("engine, HTTP"), best.get(f"batcher ({BATCHER_COMMIT})")
    peft, local = best.get("PEFT user by user"), best.get("engine, in-process")
    if engine and batcher:
        print(f"\nhighest load with p99 ≤ 2 s, engine vs batcher (HTTP both): {engine.load / batcher.load:.1f}x")
    if engine and peft:
        print(f"tokens/s there, engine over HTTP vs PEFT user by user at its best: "
              f"{engine.tokens_per_s / peft.tokens_per_s:.1f}x")
    if engine and local:
        same_load = next((lv for lv in levels if lv.system == "engine, in-process" and lv.load == engine.load), None)
        if same_load:
            print(f"HTTP vs in-process tokens/s at {engine.load:g} req/s: {engine.tokens_per_s / same_load.tokens_per_s:.2f}x")


def plot(levels: list[Level], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (tokens, p99) = plt.subplots(1, 2, figsize=(11, 4))
    for system in dict.fromkeys(level.system for level in levels):
        mine = [lv for lv in levels if lv.system == system]
        loads = [lv.load for lv in mine]
        tokens.plot(loads, [lv.tokens_per_s for lv in mine], marker="o", label=system)
        p99.plot(loads, [min(lv.p99, 60) for lv in mine], marker="o", label=system)
    for axis, title in ((tokens, "generated tokens/s"), (p99, "p99 latency (s)")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("offered load (requests/s)")
        axis.set_title(title)
        axis.grid(alpha=0.3)
    p99.set_yscale("log")
    p99.axhline(GOAL_P99_S, color="grey", linestyle="--", linewidth=1)
    tokens.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    print(f"\nplot: {path.relative_to(ROOT) if path.is_relative_to(ROOT) else path}")


if __name__ == "__main__":
    print("| system | offered req/s | tokens/s | TTFT p50 ms | TTFT p99 ms | latency p50 ms | latency p99 ms "
          "| rows per step | failed |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    main()
