"""The engine's costs that grow with a row, today beside BEFORE (the commit before the incremental
detokenizer and soft prompts served as keys/values), in one run on the same backbone and users.

Closed loop, in-process, `max_rows` rows at a time through `PrefixCache` (so each side serves the
prefix in its own form) and `Engine`:

  long streamed rows   every row streams its text (as an HTTP stream or a stop string makes it
                       watch its text) for --long tokens: decoding all its text at each token
                       costs O(n) per token before, a short window today
  long plain rows      the same rows without streaming: the control
  soft-prompt prefill  prompt-tuned users (--prompt-tokens virtual tokens), short answers (4 new
                       tokens), so prefill dominates: before, each prefill also reads the virtual
                       tokens; today they are keys/values computed once per user

Each side runs --repeat times in its own process, alternating, and each case keeps its fastest run.
Prints tokens/s (requests/s for prefill) per side and the ratio; every greedy text is the same on
both sides (checked).

    python benchmarks/bench_engine_rows.py [--rows 32] [--long 400] [--prompt-tokens 32] [--repeat 3]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.old_commit import old_package, remove_old_package  # noqa: E402

BEFORE = "1cf4092"
PROMPT = "order 3 kites for Bo, ship them to the north door, and add a note: "


def side(backbone_dir: str, home: str, args: argparse.Namespace) -> dict:
    """One side's figures (this process imports whichever `prefixfleet` PYTHONPATH gives)."""
    from prefixfleet.pipelines.serving.cache import PrefixCache
    from prefixfleet.pipelines.serving.engine import Engine, RowSettings
    from prefixfleet.registry import Registry, UserKey
    from prefixfleet.workers.backbone import load_backbone
    from prefixfleet.workers.decoding import prompt_ids

    torch.set_num_threads(1)
    backbone = load_backbone(backbone_dir)
    backbone.model.generation_config.eos_token_id = None  # every row runs its full length
    registry = Registry(f"sqlite:///{home}/mlflow.db", Path(home, "store").as_uri())
    cache = PrefixCache(registry, backbone)
    engine = Engine(backbone, max_rows=args.rows, max_queue=16 * args.rows, max_queue_per_tenant=16 * args.rows)
    ids = prompt_ids(backbone, PROMPT)

    def closed_loop(users: list[str], new: int, requests: int, stream: bool) -> tuple[float, list[str]]:
        prefixes = [cache.get(UserKey("default", u)).tensors for u in users]
        started = time.perf_counter()
        rows = [engine.submit(prefixes[i % len(users)], ids, RowSettings(new), user=i % len(users),
                              on_text=(lambda _: None) if stream else None) for i in range(requests)]
        texts = [row.future.result().text for row in rows]
        return time.perf_counter() - started, texts

    deep = [f"deep-{i}" for i in range(args.rows)]
    soft = [f"soft-{i}" for i in range(args.rows)]
    closed_loop(deep, 8, args.rows, True)  # warm up
    out = {}
    for name, users, new, requests, stream in (("long streamed rows", deep, args.long, args.rows, True),
                                               ("long plain rows", deep, args.long, args.rows, False),
                                               ("soft-prompt prefill", soft, 4, 8 * args.rows, False)):
        seconds, texts = closed_loop(users, new, requests, stream)
        out[name] = {"seconds": seconds, "tokens": new * requests, "requests": requests, "texts": texts}
    engine.close()
    return out


def publish(backbone_dir: str, home: str, args: argparse.Namespace) -> None:
    from prefixfleet.registry import Registry, UserKey
    from prefixfleet.workers.artifact import ArtifactMeta, serialize
    from prefixfleet.workers.backbone import load_backbone
    from prefixfleet.workers.prefix import expected_shapes
    from prefixfleet.workers.spec import PrefixSpec

    backbone = load_backbone(backbone_dir)
    registry = Registry(f"sqlite:///{home}/mlflow.db", Path(home, "store").as_uri())
    generator = torch.Generator().manual_seed(0)
    for kind, spec in (("deep", PrefixSpec("prefix", 8)), ("soft", PrefixSpec("prompt", args.prompt_tokens))):
        for i in range(args.rows):
            key = UserKey("default", f"{kind}-{i}")
            tensors = {n: torch.randn(s, generator=generator) for n, s in expected_shapes(backbone, spec).items()}
            meta = ArtifactMeta(key.namespace, key.user_id, spec, backbone.fingerprint, f"bench:{key.user_id}",
                                backbone=backbone.name_or_path)
            registry.publish(key, serialize(tensors, meta), promote=True)
    registry.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--long", type=int, default=400, help="new tokens of a long row (the tiny context is 512)")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--repeat", type=int, default=3, help="runs of each side, alternating")
    parser.add_argument("--side", nargs=2, help=argparse.SUPPRESS)  # backbone dir, registry home: one side
    args = parser.parse_args()
    if args.side:
        print(json.dumps(side(*args.side, args)))
        return
    from prefixfleet.workers.tiny import build_backbone

    with tempfile.TemporaryDirectory() as tmp:
        backbone_dir = str(build_backbone(Path(tmp, "backbone"), "gpt2"))
        publish(backbone_dir, tmp, args)
        command = [sys.executable, "-m", "benchmarks.bench_engine_rows", "--rows", str(args.rows), "--long",
                   str(args.long), "--prompt-tokens", str(args.prompt_tokens), "--side", backbone_dir, tmp]
        shim = old_package(Path(tmp), BEFORE)
        try:
            runs: dict[str, dict] = {}
            for _ in range(args.repeat):  # alternating sides; each case keeps its fastest run
                for name, env in (("before", {"PYTHONPATH": str(shim)}), ("today", {})):
                    done = subprocess.run(command, cwd=ROOT, env=os.environ | env, capture_output=True, text=True)
                    if done.returncode:
                        sys.exit(f"the {name} side failed:\n{done.stderr[-3000:]}")
                    run = json.loads(done.stdout.splitlines()[-1])
                    best = runs.setdefault(name, run)
                    for case, figures in run.items():
                        if figures["seconds"] < best[case]["seconds"]:
                            best[case] = figures
        finally:
            remove_old_package(Path(tmp))
    print(f"# {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} on 1 thread; tiny GPT-2, "
          f"{args.rows} rows at a time; before = {BEFORE}")
    print(f"{'case':<22} {'before':>12} {'today':>12} {'ratio':>6}  same text")
    for case in runs["today"]:
        old, new = runs["before"][case], runs["today"][case]
        unit, key = ("req/s", "requests") if case == "soft-prompt prefill" else ("tok/s", "tokens")
        rate = {n: r[key] / r["seconds"] for n, r in (("old", old), ("new", new))}
        print(f"{case:<22} {rate['old']:>8.0f} {unit} {rate['new']:>8.0f} {unit} {rate['new'] / rate['old']:5.2f}x  "
              f"{old['texts'] == new['texts']}")


if __name__ == "__main__":
    main()
