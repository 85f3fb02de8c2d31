"""Dynamic batching across users: requests for different users share one forward pass.

One worker thread collects requests while they keep coming: a batch closes when no request has
arrived for `max_wait_ms`, when `max_delay_ms` have passed since its first request, or at
`max_batch_size` requests; while it holds fewer requests than the previous batch, only the delay
closes it (clients answered together tend to come back together, and a batch started half full
splits them into cohorts that stay apart). The collected requests are grouped by prefix layout
and generation parameters, and each group runs as one `generate_ids` call, each row with its own
user's prefix. Requests that arrive while a batch runs wait in the queue and form the next one.

A thread, not an asyncio task, so one batcher serves the FastAPI event loop, a Ray Serve replica
and plain threads alike: `submit` returns a concurrent Future (`asyncio.wrap_future` awaits it).
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from collections import defaultdict
from concurrent.futures import Future
from dataclasses import dataclass

from prefixfleet.pipelines.serving.cache import ServedPrefix
from prefixfleet.workers.backbone import Backbone
from prefixfleet.workers.generate import generate_ids

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationParams:
    """Rows of one forward pass share these."""

    max_new_tokens: int = 32
    do_sample: bool = False
    temperature: float = 1.0
    top_p: float = 1.0


@dataclass(frozen=True)
class Generated:
    token_ids: list[int]
    batch_size: int  # rows in the forward pass that produced it
    users_in_batch: int  # distinct users among those rows


@dataclass
class _Request:
    prefix: ServedPrefix
    prompt: str
    params: GenerationParams
    future: Future[Generated]


_STOP = object()


class Batcher:
    """Owns one worker thread; `close()` stops it after the requests already queued."""

    def __init__(self, backbone: Backbone, *, max_batch_size: int = 32, max_wait_ms: float = 5.0,
                 max_delay_ms: float = 25.0) -> None:
        if max_batch_size < 1 or not 0 <= max_wait_ms <= max_delay_ms:
            raise ValueError("max_batch_size must be ≥ 1 and 0 ≤ max_wait_ms ≤ max_delay_ms")
        self.backbone, self.max_batch_size = backbone, max_batch_size
        self.max_wait, self.max_delay = max_wait_ms / 1000, max_delay_ms / 1000
        self._queue: queue.Queue[_Request | object] = queue.Queue()
        self._closed = False
        self._last_size = 0
        self._closing = threading.Lock()
        self.batches = 0
        self._thread = threading.Thread(target=self._loop, name="prefix-batcher", daemon=True)
        self._thread.start()

    def submit(self, prefix: ServedPrefix, prompt: str, params: GenerationParams) -> Future[Generated]:
        future: Future[Generated] = Future()
        with self._closing:
            if self._closed:
                raise RuntimeError("the batcher is closed")
            self._queue.put(_Request(prefix, prompt, params, future))
        return future

    def close(self) -> None:
        with self._closing:
            if self._closed:
                return
            self._closed = True
            self._queue.put(_STOP)
        self._thread.join()

    def _loop(self) -> None:
        while True:
            batch, stop = self._collect()
            groups: dict[tuple, list[_Request]] = defaultdict(list)
            for request in batch:
                groups[(request.prefix.layout, request.params)].append(request)
            for (_, params), rows in groups.items():
                for start in range(0, len(rows), self.max_batch_size):
                    self._generate(rows[start:start + self.max_batch_size], params)
            if stop:
                return

    def _collect(self) -> tuple[list[_Request], bool]:
        """Block for the first request, then gather more until a quiet gap, the delay or the size."""
        first = self._queue.get()
        if first is _STOP:
            return [], True
        batch, deadline = [first], time.monotonic() + self.max_delay
        while len(batch) < self.max_batch_size:
            left = deadline - time.monotonic()
            # Fewer than last time: the clients answered together are likely on their way back.
            wait = left if len(batch) < self._last_size else min(self.max_wait, left)
            try:
                item = self._queue.get(timeout=wait) if wait > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if item is _STOP:
                return batch, True
            batch.append(item)
        self._last_size = len(batch)
        return batch, False

    def _generate(self, rows: list[_Request], params: GenerationParams) -> None:
        self._forward([r for r in rows if r.future.set_running_or_notify_cancel()], params)

    def _forward(self, rows: list[_Request], params: GenerationParams) -> None:
        if not rows:
            return
        try:
            ids = generate_ids(
                self.backbone, [r.prefix.tensors for r in rows], [r.prompt for r in rows],
                max_new_tokens=params.max_new_tokens, do_sample=params.do_sample,
                temperature=params.temperature, top_p=params.top_p,
            )
        except Exception as exc:  # noqa: BLE001 - handed to the request(s) that caused it
            if len(rows) == 1:
                rows[0].future.set_exception(exc)
                return
            log.warning("a batch of %d rows failed (%s); running its rows one by one", len(rows), exc)
            for r in rows:  # a bad row fails alone, never its batch neighbours
                self._forward([r], params)
            return
        self.batches += 1
        users = len({(r.prefix.ref.namespace, r.prefix.ref.user_id) for r in rows})
        for r, row in zip(rows, ids, strict=True):
            r.future.set_result(Generated(row, len(rows), users))
