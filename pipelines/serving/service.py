"""One backbone, its prefix cache and its continuous-batching engine: what the in-process HTTP
server and the Ray Serve deployment both wrap."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from prefixfleet.pipelines.serving.cache import PrefixCache, ServedPrefix
from prefixfleet.pipelines.serving.engine import Engine, Finished, RowSettings
from prefixfleet.pipelines.serving.schemas import GenerateRequest, GenerateResponse
from prefixfleet.registry import Registry, UserKey
from prefixfleet.workers.backbone import Backbone
from prefixfleet.workers.decoding import prompt_ids
from prefixfleet.workers.sampling import Sampling


class BadRequest(ValueError):
    """A request that can never be served as asked (the message says why)."""


@dataclass(frozen=True)
class ServeConfig:
    """Cache bounds (bytes per tier) and the engine: rows decoded together, the KV budget in cache
    positions (None: `max_rows` × the backbone's context) and prompt tokens prefilled per step."""

    device_bytes: int = 512 << 20
    host_bytes: int = 1 << 30
    max_rows: int = 32
    kv_budget: int | None = None
    prefill_tokens: int = 512


class PrefixService:
    """Thread-safe; `generate` may be awaited from any event loop. `close()` finishes the requests
    already submitted, then stops the engine."""

    def __init__(self, backbone: Backbone, registry: Registry, config: ServeConfig = ServeConfig()) -> None:
        self.backbone, self.registry, self.config = backbone, registry, config
        self.cache = PrefixCache(registry, backbone, device_bytes=config.device_bytes, host_bytes=config.host_bytes)
        self.engine = Engine(backbone, max_rows=config.max_rows, kv_budget=config.kv_budget,
                             prefill_tokens=config.prefill_tokens)

    async def generate(self, request: GenerateRequest) -> GenerateResponse:
        """Raises registry.NotFound (unknown user), BackboneMismatch, InvalidUserKey or BadRequest."""
        prefix, ids = await asyncio.to_thread(self._prepare, request)
        done = await self._run(prefix, ids, settings(request))
        ref = prefix.ref
        return GenerateResponse(
            text=done.text, user_id=ref.user_id, namespace=ref.namespace, version=ref.version, sha256=ref.sha256,
            tokens=len(done.token_ids), finish_reason=done.finish_reason, batch_size=done.rows_in_step,
            users_in_batch=done.users_in_step,
        )

    async def _run(self, prefix: ServedPrefix, ids: list[int], how: RowSettings) -> Finished:
        try:
            row = self.engine.submit(prefix.tensors, ids, how, user=(prefix.ref.namespace, prefix.ref.user_id))
        except ValueError as exc:
            raise BadRequest(str(exc)) from exc
        try:
            return await asyncio.wrap_future(row.future)
        except asyncio.CancelledError:  # the caller went away: free its row
            row.cancel()
            raise

    def _prepare(self, request: GenerateRequest) -> tuple[ServedPrefix, list[int]]:
        prefix = self.cache.get(UserKey(request.namespace, request.user_id))
        ids = prompt_ids(self.backbone, request.prompt)
        limit = self.backbone.max_positions
        used = len(ids) + prefix.num_virtual_tokens + request.max_new_tokens
        if limit is not None and not self.backbone.family.encoder_decoder and used > limit:
            raise BadRequest(f"prompt ({len(ids)} tokens) + prefix ({prefix.num_virtual_tokens}) + max_new_tokens "
                             f"({request.max_new_tokens}) = {used} exceeds the backbone's context of {limit} positions")
        return prefix, ids

    def health(self) -> dict[str, Any]:
        stats = self.engine.stats
        return {
            "status": "ok", "backbone": self.backbone.name_or_path, "family": self.backbone.family.name,
            "backbone_fingerprint": self.backbone.fingerprint, "steps": stats.steps,
            "rows_per_step": round(stats.row_steps / stats.steps, 2) if stats.steps else 0.0,
            "running": self.engine.running, "queued": self.engine.queued, "cache": self.cache.usage(),
        }

    def close(self) -> None:
        self.engine.close()


def settings(request: GenerateRequest) -> RowSettings:
    sampling = Sampling(request.do_sample, request.temperature, request.top_k, request.top_p)
    return RowSettings(request.max_new_tokens, sampling, request.seed, tuple(request.stop))
