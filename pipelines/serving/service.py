"""One backbone, its prefix cache and its batcher: what the in-process HTTP server and the Ray Serve
deployment both wrap."""
from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from prefixfleet.pipelines.serving.batcher import Batcher, GenerationParams
from prefixfleet.pipelines.serving.cache import PrefixCache, ServedPrefix
from prefixfleet.pipelines.serving.schemas import GenerateRequest, GenerateResponse
from prefixfleet.registry import Registry, UserKey
from prefixfleet.workers.backbone import Backbone


class BadRequest(ValueError):
    """A request that can never be served as asked (the message says why)."""


@dataclass(frozen=True)
class ServeConfig:
    """Cache bounds (bytes per tier) and batching (rows per forward pass; a batch closes after a
    quiet gap of `max_wait_ms` or `max_delay_ms` after its first request)."""

    device_bytes: int = 512 << 20
    host_bytes: int = 1 << 30
    max_batch_size: int = 32
    max_wait_ms: float = 5.0
    max_delay_ms: float = 25.0


class PrefixService:
    """Thread-safe; `generate` may be awaited from any event loop. `close()` stops the batcher."""

    def __init__(self, backbone: Backbone, registry: Registry, config: ServeConfig = ServeConfig()) -> None:
        self.backbone, self.registry, self.config = backbone, registry, config
        self.cache = PrefixCache(registry, backbone, device_bytes=config.device_bytes, host_bytes=config.host_bytes)
        self.batcher = Batcher(backbone, max_batch_size=config.max_batch_size, max_wait_ms=config.max_wait_ms,
                               max_delay_ms=config.max_delay_ms)

    async def generate(self, request: GenerateRequest) -> GenerateResponse:
        """Raises registry.NotFound (unknown user), BackboneMismatch, InvalidUserKey or BadRequest."""
        prefix = await asyncio.to_thread(self._prepare, request)
        params = GenerationParams(request.max_new_tokens, request.do_sample, request.temperature, request.top_p)
        done = await asyncio.wrap_future(self.batcher.submit(prefix, request.prompt, params))
        ref = prefix.ref
        return GenerateResponse(
            text=self.backbone.tokenizer.decode(done.token_ids, skip_special_tokens=True),
            user_id=ref.user_id, namespace=ref.namespace, version=ref.version, sha256=ref.sha256,
            tokens=len(done.token_ids), batch_size=done.batch_size, users_in_batch=done.users_in_batch,
        )

    def _prepare(self, request: GenerateRequest) -> ServedPrefix:
        prefix = self.cache.get(UserKey(request.namespace, request.user_id))
        tokens = len(self.backbone.tokenizer(request.prompt, add_special_tokens=False).input_ids)
        if tokens == 0:
            raise BadRequest("the prompt tokenizes to nothing")
        limit = self.backbone.max_positions
        used = tokens + prefix.num_virtual_tokens + request.max_new_tokens
        if limit is not None and not self.backbone.family.encoder_decoder and used > limit:
            raise BadRequest(f"prompt ({tokens} tokens) + prefix ({prefix.num_virtual_tokens}) + max_new_tokens "
                             f"({request.max_new_tokens}) = {used} exceeds the backbone's context of {limit} positions")
        return prefix

    def health(self) -> dict[str, Any]:
        return {
            "status": "ok", "backbone": self.backbone.name_or_path, "family": self.backbone.family.name,
            "backbone_fingerprint": self.backbone.fingerprint, "batches": self.batcher.batches,
            "cache": self.cache.usage(),
        }

    def close(self) -> None:
        self.batcher.close()
