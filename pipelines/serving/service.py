"""One backbone, its prefix cache and its continuous-batching engine: what the in-process HTTP
server and the Ray Serve deployment both wrap."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Future
from dataclasses import dataclass, replace
from functools import partial
from typing import Any

from prefixfleet.pipelines.serving.cache import PrefixCache, ServedPrefix
from prefixfleet.pipelines.serving.engine import Engine, Finished, Row, RowSettings
from prefixfleet.pipelines.serving.fair_queue import QueueFull
from prefixfleet.pipelines.serving.keys import TRUSTED, Caller
from prefixfleet.pipelines.serving.metrics import ServiceMetrics
from prefixfleet.pipelines.serving.schemas import GenerateRequest, GenerateResponse
from prefixfleet.registry import Registry, UserKey
from prefixfleet.workers.backbone import Backbone
from prefixfleet.workers.decoding import prompt_ids
from prefixfleet.workers.errors import WorkerError
from prefixfleet.workers.sampling import Sampling


class BadRequest(ValueError):
    """A request that can never be served as asked (the message says why)."""


class Busy(Exception):
    """No room to wait now (429): the message says whose line is full."""

    retry_after_s = 1


class RequestTimeout(Exception):
    """The request ran past the server's request timeout; its rows were cancelled."""


class ClientGone(Exception):
    """The client went away before its answer; its rows were cancelled."""


@dataclass(frozen=True)
class ServeConfig:
    """Cache bounds (bytes per tier) and the engine: rows decoded together, the KV budget in cache
    positions (None: `max_rows` × the backbone's context) and prompt tokens prefilled per step.
    Limits: new and prompt tokens per request (a chat completion that names no limit generates up
    to `max_new_tokens`), requests waiting per namespace and in all, seconds per request."""

    device_bytes: int = 512 << 20
    host_bytes: int = 1 << 30
    max_rows: int = 32
    kv_budget: int | None = None
    prefill_tokens: int = 512
    max_new_tokens: int = 1024
    max_prompt_tokens: int = 8192
    max_queue: int = 256
    max_queue_per_tenant: int = 64
    request_timeout_s: float = 600.0


@dataclass
class Choices:
    """The rows of one request: prompt i, sample j is choice i × n + j. `events()` yields
    (choice, text) as text is decided and (choice, Finished) as each ends."""

    prefix: ServedPrefix
    rows: list[Row]
    prompt_tokens: int
    _events: asyncio.Queue[tuple[int, str | Future[Finished]]]

    def cancel(self) -> None:
        for row in self.rows:
            row.cancel()

    async def finished(self) -> list[Finished]:
        try:
            return list(await asyncio.gather(*(asyncio.wrap_future(r.future) for r in self.rows)))
        except BaseException:  # the caller went away, or a row failed: free every row
            self.cancel()
            raise

    async def events(self) -> AsyncIterator[tuple[int, str | Finished]]:
        """Text that arrived while the consumer was busy comes as one piece per choice: a stream
        that falls behind sends fewer, longer events rather than one per token."""
        left = len(self.rows)
        try:
            while left:
                ready = [await self._events.get()]
                while not self._events.empty():
                    ready.append(self._events.get_nowait())
                text: dict[int, list[str]] = {}
                for index, item in ready:
                    if isinstance(item, str):
                        text.setdefault(index, []).append(item)
                        continue
                    if index in text:
                        yield index, "".join(text.pop(index))
                    left -= 1
                    yield index, item.result()  # a failed row raises here
                for index, pieces in text.items():
                    yield index, "".join(pieces)
        finally:
            self.cancel()


class PrefixService:
    """Thread-safe; `generate` may be awaited from any event loop. `close()` finishes the requests
    already submitted, then stops the engine."""

    def __init__(self, backbone: Backbone, registry: Registry, config: ServeConfig = ServeConfig()) -> None:
        self.backbone, self.registry, self.config = backbone, registry, config
        self.cache = PrefixCache(registry, backbone, device_bytes=config.device_bytes, host_bytes=config.host_bytes)
        self.engine = Engine(backbone, max_rows=config.max_rows, kv_budget=config.kv_budget,
                             prefill_tokens=config.prefill_tokens, max_queue=config.max_queue,
                             max_queue_per_tenant=config.max_queue_per_tenant)
        self.metrics = ServiceMetrics(self.engine, self.cache)

    async def generate(self, request: GenerateRequest, caller: Caller = TRUSTED,
                       gone: Callable[[], Awaitable[None]] | None = None) -> GenerateResponse:
        """Raises registry.NotFound (unknown user, or one the caller may not use), BackboneMismatch,
        InvalidUserKey, BadRequest, Busy, RequestTimeout or ClientGone (once `gone()` returns)."""
        key = caller.user(request.namespace, request.user_id)
        choices = await self.submit(key, [request.prompt], settings(request))
        done, = await self.finished(choices, gone)
        ref = choices.prefix.ref
        return GenerateResponse(
            text=done.text, user_id=ref.user_id, namespace=ref.namespace, version=ref.version, sha256=ref.sha256,
            tokens=len(done.token_ids), finish_reason=done.finish_reason, batch_size=done.rows_in_step,
            users_in_batch=done.users_in_step,
        )

    async def finished(self, choices: Choices, gone: Callable[[], Awaitable[None]] | None = None) -> list[Finished]:
        """Every choice's outcome, within the request timeout and while the client is there
        (`gone()` returns once it has left)."""
        work = asyncio.ensure_future(choices.finished())
        watchers = {work} | ({asyncio.ensure_future(gone())} if gone is not None else set())
        try:
            done, _ = await asyncio.wait(watchers, timeout=self.config.request_timeout_s,
                                         return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in watchers - {work}:
                task.cancel()
        if work in done:
            return work.result()
        work.cancel()
        choices.cancel()
        if done:
            raise ClientGone("the client went away")
        raise RequestTimeout(f"the request did not finish within {self.config.request_timeout_s:g} s")

    async def submit(self, key: UserKey, prompts: list[str], how: RowSettings, n: int = 1, *,
                     fit_context: bool = False) -> Choices:
        """Queue n rows per prompt with the user's production prefix (a seeded request's sample j
        uses seed + j); `fit_context`: fewer new tokens than asked where the context ends sooner.
        Raises as `generate` does, before anything runs."""
        if how.max_new_tokens > self.config.max_new_tokens:
            raise BadRequest(f"max_new_tokens ({how.max_new_tokens}) exceeds this server's limit of "
                             f"{self.config.max_new_tokens} new tokens per request")
        prefix = await asyncio.to_thread(self.cache.get, key)
        ids = [self._prompt_ids(prefix, prompt, how.max_new_tokens, fit_context) for prompt in prompts]
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[tuple[int, str | Future[Finished]]] = asyncio.Queue()
        choices = Choices(prefix, [], sum(map(len, ids)), events)
        owner = (prefix.ref.namespace, prefix.ref.user_id)
        try:
            for index, row_ids in enumerate(i for i in ids for _ in range(n)):
                fits = self.context_left(prefix, len(row_ids))
                row_how = replace(how, seed=None if how.seed is None else how.seed + index % n,
                                  max_new_tokens=min(how.max_new_tokens, fits or how.max_new_tokens))
                row = self.engine.submit(prefix.tensors, row_ids, row_how, user=owner, tenant=owner[0],
                                         on_text=partial(_post, loop, events, index))
                row.future.add_done_callback(partial(_post, loop, events, index))
                row.future.add_done_callback(self._observe)
                choices.rows.append(row)
        except ValueError as exc:
            choices.cancel()
            raise BadRequest(str(exc)) from exc
        except QueueFull as exc:
            choices.cancel()
            raise Busy(str(exc)) from exc
        return choices

    def _observe(self, future: Future[Finished]) -> None:
        if not future.cancelled() and future.exception() is None:
            self.metrics.observe(future.result())

    def _prompt_ids(self, prefix: ServedPrefix, prompt: str, max_new_tokens: int, fit_context: bool) -> list[int]:
        try:
            ids = prompt_ids(self.backbone, prompt)
        except WorkerError as exc:
            raise BadRequest(str(exc)) from exc
        if len(ids) > self.config.max_prompt_tokens:
            raise BadRequest(f"the prompt has {len(ids)} tokens; this server takes at most "
                             f"{self.config.max_prompt_tokens} prompt tokens per request")
        limit = self.context_left(prefix, len(ids))
        if limit is not None and (limit < 1 or max_new_tokens > limit and not fit_context):
            raise BadRequest(f"prompt ({len(ids)} tokens) + prefix ({prefix.num_virtual_tokens}) + max_new_tokens "
                             f"({max_new_tokens}) exceeds the backbone's context of {self.backbone.max_positions} positions")
        return ids

    def context_left(self, prefix: ServedPrefix, prompt_tokens: int) -> int | None:
        """New tokens that still fit the backbone's context (None: no limit)."""
        limit = self.backbone.max_positions
        if limit is None or self.backbone.family.encoder_decoder:
            return None
        return limit - prompt_tokens - prefix.num_virtual_tokens

    def list_models(self, limit: int, after: UserKey | None, namespace: str | None = None) -> tuple[list[UserKey], bool]:
        """Up to `limit` users with a production prefix (of one namespace, or all), in the
        registry's order, after the user `after`; and whether more follow. Reads the registry's
        listing from its start: a deep page costs the pages before it."""
        start = after.model_name(self.registry.prefix) if after else ""
        page: list[UserKey] = []
        for key, model in self.registry.models(namespace):
            if model.name <= start or self.cache.alias not in model.aliases:
                continue
            if len(page) == limit:
                return page, True
            page.append(key)
        return page, False

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


def _post(loop: asyncio.AbstractEventLoop, events: asyncio.Queue, index: int, item: str | Future[Finished]) -> None:
    """From the engine thread to the request's event loop (a loop already gone drops it)."""
    try:
        loop.call_soon_threadsafe(events.put_nowait, (index, item))
    except RuntimeError:
        pass


def settings(request: GenerateRequest) -> RowSettings:
    sampling = Sampling(request.do_sample, request.temperature, request.top_k, request.top_p)
    return RowSettings(request.max_new_tokens, sampling, request.seed, tuple(request.stop))
