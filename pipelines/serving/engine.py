"""Continuous batching of users' prefixes: one thread runs decode steps over every running row.

Rows join at any step: waiting requests are prefilled through the shared prefix wiring (those of
one prefix layout together) and join the running batch before the next step
(`workers.decoding`). Rows leave the step they end — end-of-sequence, `max_new_tokens`, a stop
string, or a cancel — and their slot and cache columns are freed at once. After prefill a row is
a key/value cache, so rows of every method and prefix length share every step; only prefill
reads the prefix's layout.

Each row has its own `max_new_tokens`, sampling settings, stop strings and random generator (a
seeded row draws the same tokens whoever shares its steps).

Waiting requests stand in one line per tenant (`FairQueue`, bounded per tenant and in all), and
admission takes the tenants' heads in turn. Memory is bounded by admission: the batch's cache is
left-padded, so it holds rows × (its longest row) tokens. A request is admitted only while
(running rows + 1) × (the longest need among them) stays within `kv_budget` tokens, a row's need
being prefix + prompt + max_new_tokens (T5: the decoder's prefix + 1 + max_new_tokens, plus its
encoder length). A request that could never fit is refused at submit.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch

from prefixfleet.pipelines.serving.detokenizer import IncrementalText
from prefixfleet.pipelines.serving.fair_queue import FairQueue
from prefixfleet.workers import decoding
from prefixfleet.workers.backbone import Backbone
from prefixfleet.workers.prefix import PrefixTensors
from prefixfleet.workers.sampling import Sampling, next_tokens, row_generator

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RowSettings:
    """What one request asks for."""

    max_new_tokens: int = 32
    sampling: Sampling = Sampling()
    seed: int | None = None
    stop: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be ≥ 1")
        if any(not s for s in self.stop):
            raise ValueError("a stop string must not be empty")


@dataclass(frozen=True)
class Finished:
    """A request's outcome. `finish_reason`: "stop" (end-of-sequence or a stop string) or "length";
    `token_ids` run through end-of-sequence, `text` ends before a stop string."""

    token_ids: list[int]
    text: str
    finish_reason: str
    prompt_tokens: int
    rows_in_step: int  # the most rows that shared a decode step with this one
    users_in_step: int  # distinct users among the rows of that step
    first_token_s: float  # from submit to the first new token
    latency_s: float  # from submit to the last


class Cancelled(Exception):
    """The request was cancelled before it finished."""


@dataclass
class EngineStats:
    steps: int = 0
    row_steps: int = 0  # rows summed over steps: row_steps / steps = rows per step
    prefills: int = 0
    tokens: int = 0  # new tokens chosen, every row's
    finished: int = 0
    peak_rows: int = 0
    peak_cached_tokens: int = 0


@dataclass(frozen=True)
class Need:
    """Cache positions a row may come to hold: in the decoder's self-attention, and its encoder's."""

    decoder: int
    encoder: int

    @property
    def total(self) -> int:
        return self.decoder + self.encoder


@dataclass(eq=False)
class Row:
    """A submitted request: its `future` gets a Finished (or the error); `on_text`, when given,
    receives the text as it is decided, from the engine thread."""

    prefix: PrefixTensors | None
    ids: list[int]
    settings: RowSettings
    user: Hashable
    need: Need
    on_text: Callable[[str], None] | None = None
    future: Future[Finished] = field(default_factory=Future)
    tokens: list[int] = field(default_factory=list)
    reader: IncrementalText | None = None  # the text so far, for rows that stream or watch for stop strings
    sent: int = 0
    widest: tuple[int, int] = (0, 0)
    generator: torch.Generator | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.monotonic)
    first_token: float | None = None

    def cancel(self) -> None:
        """Stop generating for this request; its slot is freed before the next step."""
        self.cancelled.set()


class Engine:
    """Owns one decode thread; `close()` finishes every submitted request, then stops it."""

    def __init__(self, backbone: Backbone, *, max_rows: int = 32, kv_budget: int | None = None,
                 prefill_tokens: int = 512, max_queue: int = 256, max_queue_per_tenant: int = 64) -> None:
        if max_rows < 1 or prefill_tokens < 1:
            raise ValueError("max_rows and prefill_tokens must be ≥ 1")
        self.backbone, self.max_rows, self.prefill_tokens = backbone, max_rows, prefill_tokens
        self.kv_budget = kv_budget or max_rows * (backbone.max_positions or 2048)
        config = backbone.model.generation_config
        eos = config.eos_token_id
        self._eos = set(eos) if isinstance(eos, list) else ({eos} if eos is not None else set())
        self._suppressed = torch.tensor(list(config.suppress_tokens or []), dtype=torch.long)
        self._waiting: FairQueue[Row] = FairQueue(max_queue_per_tenant, max_queue)
        self._running: list[Row] = []
        self._state: decoding.Rows | None = None
        self._logits: torch.Tensor | None = None
        self._wake = threading.Condition()
        self._closed = False
        self.stats = EngineStats()
        self._threads = torch.get_num_threads()
        self._thread = threading.Thread(target=self._loop, name="prefix-engine", daemon=True)
        self._thread.start()

    def submit(self, prefix: PrefixTensors | None, ids: Sequence[int], settings: RowSettings = RowSettings(), *,
               user: Hashable = None, tenant: Hashable = None, on_text: Callable[[str], None] | None = None) -> Row:
        """Queue one request (`ids`: `decoding.prompt_ids`) in its tenant's line. Raises ValueError
        when it could never fit the KV budget, QueueFull when its line or the queue is full,
        RuntimeError once the engine is closed."""
        need = row_need(self.backbone, prefix, len(ids), settings.max_new_tokens)
        if need.total > self.kv_budget:
            raise ValueError(f"the request needs {need.total} cache positions (prefix + prompt + "
                             f"max_new_tokens), more than the server's KV budget of {self.kv_budget}")
        row = Row(prefix, list(ids), settings, user, need, on_text)
        with self._wake:
            if self._closed:
                raise RuntimeError("the engine is closed")
            self._waiting.push(tenant, row)
            self._wake.notify()
        return row

    def close(self) -> None:
        with self._wake:
            self._closed = True
            self._wake.notify()
        self._thread.join()

    @property
    def queued(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._running)

    # ---- the decode thread ----------------------------------------------------------------------

    def _loop(self) -> None:
        # OpenMP's thread count belongs to each thread: without this the engine would run on the
        # default count, not the one the process set (on 2 cores, 1 is ~1.4× faster for small models).
        torch.set_num_threads(self._threads)
        while True:
            with self._wake:
                while not self._waiting and not self._running and not self._closed:
                    self._wake.wait()
                if self._closed and not self._waiting and not self._running:
                    return
            try:
                self._admit()
                if self._running:
                    self._step()
            except Exception as exc:  # noqa: BLE001 - the engine outlives any one step
                log.exception("a step of %d rows failed", len(self._running))
                self._abort_running(exc)

    def _admit(self) -> None:
        """Prefill waiting rows while they fit (rows, KV budget, this step's prefill tokens), those of
        one prefix layout together."""
        admitted: list[Row] = []
        tokens = 0
        with self._wake:
            while self._waiting and tokens < self.prefill_tokens and self._fits(self._waiting.head(), admitted):
                row = self._waiting.pop()
                if row.cancelled.is_set() or not row.future.set_running_or_notify_cancel():
                    self._fail(row, Cancelled("cancelled before it started"))
                    continue
                admitted.append(row)
                tokens += len(row.ids)
        try:
            groups: dict[tuple, list[Row]] = {}
            for row in admitted:
                groups.setdefault(layout(row.prefix), []).append(row)
            for group in groups.values():
                self._prefill(group)
        except Exception as exc:  # noqa: BLE001 - an admitted row is answered, never dropped
            log.exception("admitting %d rows failed", len(admitted))
            for row in admitted:
                if row not in self._running:
                    self._fail(row, exc)

    def _prefill(self, rows: list[Row]) -> None:
        try:
            for row in rows:
                if row.settings.sampling.do_sample:
                    row.generator = row_generator(row.settings.seed, self.backbone.device)
            state, logits = decoding.prefill(self.backbone, [r.prefix for r in rows], [r.ids for r in rows])
            joined = decoding.join(self._state, state)
            logits = logits if self._logits is None else torch.cat([self._logits, logits])
        except Exception as exc:  # noqa: BLE001 - a bad request fails alone, never its neighbours
            if len(rows) == 1:
                self._fail(rows[0], exc)
            else:
                for row in rows:
                    self._prefill([row])
            return
        self.stats.prefills += 1
        self._state, self._logits = joined, logits
        self._running += rows

    def _abort_running(self, exc: Exception) -> None:
        """Nothing of a failed step can be trusted: its rows fail with its error, the engine goes on."""
        for row in self._running:
            self._fail(row, exc)
        self._running, self._state, self._logits = [], None, None

    def _fits(self, row: Row, admitted: list[Row]) -> bool:
        rows = [*self._running, *admitted, row]
        if len(rows) > self.max_rows:
            return False
        decoder = max(r.need.decoder for r in rows)
        encoder = max(r.need.encoder for r in rows)
        return len(rows) * (decoder + encoder) <= self.kv_budget

    def _step(self) -> None:
        rows, logits = self._running, self._logits
        if len(self._suppressed):
            logits[:, self._suppressed] = float("-inf")
        tokens = next_tokens(logits, [r.settings.sampling for r in rows], [r.generator for r in rows])
        width = (len(rows), len({r.user for r in rows}))
        self.stats.tokens += len(rows)
        stay = []
        for index, (row, token) in enumerate(zip(rows, tokens.tolist(), strict=True)):
            row.widest = max(row.widest, width)
            if row.cancelled.is_set():
                self._fail(row, Cancelled("cancelled"))
            elif not self._advance(row, token):
                stay.append(index)
        self._running = [rows[i] for i in stay]
        self._state = decoding.keep(self._state, stay)
        self._logits = None
        if not self._running:
            return
        self._logits = decoding.decode_step(self.backbone, self._state, tokens[stay])
        stats = self.stats
        stats.steps += 1
        stats.row_steps += len(self._running)
        stats.peak_rows = max(stats.peak_rows, len(self._running))
        encoder = 0 if self._state.encoder_mask is None else self._state.encoder_mask.shape[1]
        stats.peak_cached_tokens = max(stats.peak_cached_tokens, len(self._state) * (self._state.length + encoder))

    def _advance(self, row: Row, token: int) -> bool:
        """Take the row's next token; True when the row is done (and answered)."""
        row.tokens.append(token)
        if row.first_token is None:
            row.first_token = time.monotonic()
        eos = token in self._eos
        last = eos or len(row.tokens) >= row.settings.max_new_tokens
        if last:  # the whole decode: the reader may hold back an unfinished character
            text = self._text(row.tokens[:-1] if eos else row.tokens)
        elif row.settings.stop or row.on_text is not None:
            if row.reader is None:
                row.reader = IncrementalText(self._text)
            text = row.reader.read(row.tokens)
        else:
            return False
        for stop in row.settings.stop:
            if (at := text.find(stop)) >= 0:
                return self._finish(row, "stop", text[:at])
        if last:
            return self._finish(row, "stop" if eos else "length", text)
        if row.on_text is not None:
            # Hold back what could still become a stop string, and an unfinished character.
            hold = max((len(s) - 1 for s in row.settings.stop), default=0)
            safe = len(text) - hold
            while safe > row.sent and text[safe - 1] == "\ufffd":
                safe -= 1
            self._send(row, text[row.sent:safe])
        return False

    def _finish(self, row: Row, reason: str, text: str) -> bool:
        self._send(row, text[row.sent:])
        self.stats.finished += 1
        first = (row.first_token or row.submitted) - row.submitted
        row.future.set_result(Finished(list(row.tokens), text, reason, len(row.ids), *row.widest, first,
                                       time.monotonic() - row.submitted))
        return True

    def _send(self, row: Row, delta: str) -> None:
        if delta and row.on_text is not None:
            row.sent += len(delta)
            try:
                row.on_text(delta)
            except Exception:  # noqa: BLE001 - a broken listener must not stop the engine
                log.exception("a text listener failed; cancelling its row")
                row.cancel()

    def _text(self, tokens: list[int]) -> str:
        return self.backbone.tokenizer.decode(tokens, skip_special_tokens=True)

    @staticmethod
    def _fail(row: Row, exc: BaseException) -> None:
        if not row.future.done():
            if row.future.running() or row.future.set_running_or_notify_cancel():
                row.future.set_exception(exc)


def row_need(backbone: Backbone, prefix: PrefixTensors | None, prompt_tokens: int, max_new_tokens: int) -> Need:
    """The cache positions a request may come to hold."""
    decoder = prefix_length(prefix, "decoder")
    if backbone.family.encoder_decoder:
        return Need(decoder + 1 + max_new_tokens, prefix_length(prefix, "prompt") + prompt_tokens)
    return Need(decoder + prefix_length(prefix, "prompt") + prompt_tokens + max_new_tokens, 0)


def layout(prefix: PrefixTensors | None) -> tuple:
    """Rows of one prefill share this: their prefix's stacks and shapes (() for none)."""
    return () if prefix is None else tuple(sorted((name, tuple(t.shape)) for name, t in prefix.items()))


def prefix_length(prefix: PrefixTensors | None, stack: str) -> int:
    """Positions a prefix puts in front of a stack: "decoder" (deep prefix) or "prompt" (soft prompt)."""
    if prefix is None or stack not in prefix:
        return 0
    return int(prefix[stack].shape[-2])
