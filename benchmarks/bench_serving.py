"""Serving speed: many concurrent users, each with their own prefix, on one tiny backbone.

Every user runs a closed loop (send a request, wait for the answer, send the next). Systems, in one run:

  PEFT user by user   one PeftModel, one PrefixTuning adapter per user (written by
                      workers.peft_interop.export_peft from the same prefixes), a single worker
                      serving requests in arrival order: set_adapter(user), generate. In-process.
  ours, no batching   our service with max_rows=1 (what cross-user batching is worth).
  ours, in-process    our service: cache + continuous-batching engine, called directly.
  ours, HTTP          the same service behind the in-process uvicorn server, over loopback HTTP
                      from clients in another process.

Reports generated tokens/s, p50/p99 request latency, rows per decode step and the ratio to PEFT.
Correctness is checked against ours generating for each user alone: every system's text for each
(user, prompt), PEFT's forward pass on that continuation (its argmax must predict it token by
token), and whether PEFT's own generate used the prefix at all. Clients are threads (of the
benchmark process, except for HTTP).

    python benchmarks/bench_serving.py [--users 32] [--requests 4] [--max-new-tokens 32] [--family gpt2]
"""
from __future__ import annotations

import argparse
import asyncio
import multiprocessing as mp
import os
import statistics
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import httpx
import torch
from peft import PeftModel

from prefixfleet.pipelines.serving import GenerateRequest, InProcessServer, PrefixService, ServeConfig, create_app
from prefixfleet.registry import Registry, UserKey
from prefixfleet.workers.artifact import ArtifactMeta, serialize
from prefixfleet.workers.backbone import Backbone, load_backbone
from prefixfleet.workers.generate import generate_ids
from prefixfleet.workers.peft_interop import export_peft
from prefixfleet.workers.prefix import PrefixTensors, expected_shapes
from prefixfleet.workers.spec import PrefixSpec
from prefixfleet.workers.synthetic import user_id, user_rows
from prefixfleet.workers.tiny import build_backbone

SPEC = PrefixSpec(method="prefix", num_virtual_tokens=8)

# (user index, request index) -> (generated text, generated tokens)
Answer = Callable[[int, int], tuple[str, int]]


@dataclass
class Run:
    name: str
    seconds: float
    latencies: list[float]
    outputs: dict[tuple[int, int], tuple[str, int]]
    rows_per_pass: float = 1.0

    @property
    def tokens_per_s(self) -> float:
        return sum(tokens for _, tokens in self.outputs.values()) / self.seconds

    def latency_ms(self, q: float) -> float:
        ordered = sorted(self.latencies)
        return 1000 * ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def closed_loop(name: str, answer: Answer, users: int, requests: int) -> Run:
    """`users` clients at once, each sending `requests` requests one after another."""
    latencies: list[float] = []
    outputs: dict[tuple[int, int], tuple[str, int]] = {}
    lock = threading.Lock()

    def client(u: int) -> None:
        for r in range(requests):
            start = time.perf_counter()
            out = answer(u, r)
            with lock:
                latencies.append(time.perf_counter() - start)
                outputs[(u, r)] = out

    start = time.perf_counter()
    with ThreadPoolExecutor(users) as pool:
        list(pool.map(client, range(users)))
    return Run(name, time.perf_counter() - start, latencies, outputs)


def peft_model(backbone_dir: str, adapters: dict[int, Path]) -> tuple[PeftModel, Backbone]:
    """One PeftModel holding every user's adapter (named u0, u1, …) on its own copy of the backbone."""
    base = load_backbone(backbone_dir)
    model = PeftModel.from_pretrained(base.model, str(adapters[0]), adapter_name="u0")
    for u, path in adapters.items():
        if u:
            model.load_adapter(str(path), adapter_name=f"u{u}")
    return model.eval(), base


def peft_server(model: PeftModel, base: Backbone, prompts: dict[tuple[int, int], str],
                max_new_tokens: int) -> tuple[Answer, Callable[[], None]]:
    """One worker serving requests in arrival order, one at a time, switching adapters per request."""
    tok, worker = base.tokenizer, ThreadPoolExecutor(1)

    @torch.no_grad()
    def serve_one(u: int, r: int) -> tuple[str, int]:
        model.set_adapter(f"u{u}")
        enc = tok(prompts[(u, r)], return_tensors="pt", add_special_tokens=False)
        out = model.generate(input_ids=enc.input_ids, attention_mask=enc.attention_mask, do_sample=False,
                             max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id)
        ids = out[0, enc.input_ids.shape[1]:].tolist()
        ids = ids[: ids.index(tok.eos_token_id) + 1] if tok.eos_token_id in ids else ids
        return tok.decode(ids, skip_special_tokens=True), len(ids)

    return (lambda u, r: worker.submit(serve_one, u, r).result()), worker.shutdown


def service_client(service: PrefixService, prompts: dict[tuple[int, int], str],
                   max_new_tokens: int) -> tuple[Answer, Callable[[], None]]:
    """Requests handed to one event loop on its own thread, as a server would run them."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def answer(u: int, r: int) -> tuple[str, int]:
        request = GenerateRequest(user_id=user_id(u), prompt=prompts[(u, r)], max_new_tokens=max_new_tokens)
        response = asyncio.run_coroutine_threadsafe(service.generate(request), loop).result()
        return response.text, response.tokens

    def stop() -> None:
        loop.call_soon_threadsafe(loop.stop)
        thread.join()
        loop.close()

    return answer, stop


def http_client(url: str, users: int, prompts: dict[tuple[int, int], str],
                max_new_tokens: int) -> tuple[Answer, Callable[[], None]]:
    http = httpx.Client(base_url=url, timeout=600, limits=httpx.Limits(max_connections=users))

    def answer(u: int, r: int) -> tuple[str, int]:
        response = http.post("/v1/generate", json={"user_id": user_id(u), "prompt": prompts[(u, r)],
                                                   "max_new_tokens": max_new_tokens})
        response.raise_for_status()
        body = response.json()
        return body["text"], body["tokens"]
    return answer, http.close


def http_load(name: str, url: str, users: int, requests: int, prompts: dict[tuple[int, int], str],
              max_new_tokens: int) -> Run:
    """The HTTP closed loop, run in a separate process so that clients do not share the server's GIL."""
    answer, stop = http_client(url, users, prompts, max_new_tokens)
    try:
        return closed_loop(name, answer, users, requests)
    finally:
        stop()


@dataclass
class Agreement:
    """How each system's text compares with ours generating for one user alone."""

    alone: dict[tuple[int, int], str]  # our single-user generation: the reference
    peft_forward: int  # pairs whose continuation PEFT's forward pass predicts token by token
    peft_generate_bare: int  # pairs where PEFT's generate gave the bare backbone's text


@torch.no_grad()
def agreement(backbone: Backbone, tensors: dict[int, PrefixTensors], model: PeftModel,
              prompts: dict[tuple[int, int], str], peft_texts: dict[tuple[int, int], str],
              max_new_tokens: int) -> Agreement:
    tok = backbone.tokenizer
    alone, forward, bare = {}, 0, 0
    for (u, r), prompt in prompts.items():
        ids, = generate_ids(backbone, [tensors[u]], [prompt], max_new_tokens=max_new_tokens)
        plain, = generate_ids(backbone, [None], [prompt], max_new_tokens=max_new_tokens)
        alone[(u, r)] = tok.decode(ids, skip_special_tokens=True)
        bare += peft_texts[(u, r)] == tok.decode(plain, skip_special_tokens=True)
        prompt_ids = tok(prompt, add_special_tokens=False).input_ids
        model.set_adapter(f"u{u}")
        with warnings.catch_warnings():  # PEFT itself passes transformers the deprecated past_key_values
            warnings.simplefilter("ignore", FutureWarning)
            scores = model(input_ids=torch.tensor([prompt_ids + ids])).logits[0]
        forward += scores[len(prompt_ids) - 1:-1].argmax(-1).tolist() == ids
    return Agreement(alone, forward, bare)


def publish(registry: Registry, backbone: Backbone, users: int,
            adapters_dir: Path) -> tuple[dict[int, Path], dict[int, PrefixTensors]]:
    """A random prefix per user, published as production, and the same prefix as a PEFT adapter."""
    adapters, prefixes = {}, {}
    for u in range(users):
        generator = torch.Generator().manual_seed(u)
        tensors: PrefixTensors = {k: torch.randn(s, generator=generator) * 0.5
                                  for k, s in expected_shapes(backbone, SPEC).items()}
        key = UserKey("default", user_id(u))
        meta = ArtifactMeta(key.namespace, key.user_id, SPEC, backbone.fingerprint, f"bench:{u}",
                            backbone=backbone.name_or_path)
        ref = registry.publish(key, serialize(tensors, meta))
        registry.promote(key, ref.version)
        adapters[u] = export_peft(backbone, tensors, SPEC, adapters_dir / user_id(u))
        prefixes[u] = tensors
    return adapters, prefixes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=32)
    parser.add_argument("--requests", type=int, default=4, help="requests per user, one after another")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--family", default="gpt2", choices=["gpt2", "llama"])
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads for every system (small models run best on one)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    root = Path(tempfile.mkdtemp(prefix="bench-serving-"))
    backbone_dir = str(build_backbone(root / "backbone", args.family, hidden=args.hidden, layers=args.layers))
    backbone = load_backbone(backbone_dir)
    registry = Registry(f"sqlite:///{root / 'mlflow.db'}", (root / "store").as_uri())
    adapters, prefixes = publish(registry, backbone, args.users, root / "adapters")
    prompts = {(u, r): user_rows(u, r + 1)[r]["prompt"] for u in range(args.users) for r in range(args.requests)}
    print(f"backbone: tiny {args.family} hidden={args.hidden} layers={args.layers}, CPU threads={torch.get_num_threads()}; "
          f"{args.users} users x {args.requests} requests, {args.max_new_tokens} new tokens max, "
          f"prefix {SPEC.method} of {SPEC.num_virtual_tokens} tokens; load average {os.getloadavg()[0]:.1f}")

    def measure(name: str, answer: Answer, service: PrefixService | None = None,
                load: Callable[[], Run] | None = None) -> Run:
        closed_loop("warm-up", answer, args.users, 1)
        stats = service.engine.stats if service else None
        before = (stats.steps, stats.row_steps) if stats else (0, 0)
        run = load() if load else closed_loop(name, answer, args.users, args.requests)
        if stats:
            run.rows_per_pass = (stats.row_steps - before[1]) / max(1, stats.steps - before[0])
        return run

    def service(batch: int) -> PrefixService:
        return PrefixService(backbone, registry, ServeConfig(max_rows=batch))

    runs: list[Run] = []
    peft, peft_base = peft_model(backbone_dir, adapters)
    answer, stop = peft_server(peft, peft_base, prompts, args.max_new_tokens)
    runs.append(measure("PEFT user by user", answer))
    stop()
    for name, batch in (("ours, no batching", 1), ("ours, in-process", args.users)):
        served = service(batch)
        answer, stop = service_client(served, prompts, args.max_new_tokens)
        runs.append(measure(name, answer, served))
        stop()
        served.close()
    served = service(args.users)
    with InProcessServer(create_app(served), port=0) as url:
        answer, stop = http_client(url, args.users, prompts, args.max_new_tokens)
        with mp.get_context("spawn").Pool(1) as clients:
            load = partial(clients.apply, http_load, ("ours, HTTP", url, args.users, args.requests, prompts,
                                                      args.max_new_tokens))
            runs.append(measure("ours, HTTP", answer, served, load))
        stop()
    served.close()
    registry.close()

    first = runs[0]
    agreed = agreement(backbone, prefixes, peft, prompts, {k: v[0] for k, v in first.outputs.items()},
                       args.max_new_tokens)
    pairs = len(prompts)
    print("\n| system | tokens/s | p50 latency (ms) | p99 latency (ms) | rows per step | vs PEFT | same text as ours alone |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for run in runs:
        same = sum(run.outputs[k][0] == agreed.alone[k] for k in prompts)
        print(f"| {run.name} | {run.tokens_per_s:,.0f} | {run.latency_ms(0.5):,.0f} | {run.latency_ms(0.99):,.0f} "
              f"| {run.rows_per_pass:.1f} | {run.tokens_per_s / first.tokens_per_s:.1f}x | {same}/{pairs} |")
    mean_tokens = statistics.mean(t for _, t in first.outputs.values())
    print(f"\nPEFT's forward pass predicts our single-user continuation token by token for {agreed.peft_forward}/{pairs}"
          f" (user, prompt) pairs; PEFT's generate gave the bare backbone's text for {agreed.peft_generate_bare}/{pairs}.")
    print(f"load average {os.getloadavg()[0]:.1f}; mean tokens per request: {mean_tokens:.1f}")


if __name__ == "__main__":
    main()
