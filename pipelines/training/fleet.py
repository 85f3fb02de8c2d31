"""The driver's side of a job: start trainer actors, feed them chunks of users, count outcomes.

Chunks are ranges of rows of the ingested blocks: the driver holds block references, never the
users' data, and takes the next chunk only when an actor can queue it. Each actor has at most two
chunks queued, so it starts the next chunk the moment one ends. Actors are spread over the
cluster's nodes. A chunk interrupted by a crash is retried by Ray on the restarted actor
(`max_task_retries`). An actor lost for good — its restarts spent, or its node gone (Ray would
wait to restart it on a node with room, which a fixed cluster may never have) — is dropped and
its chunks go to the actors left, up to CHUNK_ATTEMPTS times each: the actors' plan finishes
what the lost one had published, so no user is published twice. Once a user fails because a
server stayed unreachable past the outage deadline, no chunk is started: the chunks waiting are
reported not started, for a re-run to finish.
"""
from __future__ import annotations

import logging
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import ray
from ray.exceptions import ActorUnavailableError, RayActorError, RayError

from prefixfleet.pipelines.training.actor import TrainerActor
from prefixfleet.pipelines.training.errors import JobError
from prefixfleet.pipelines.training.ingest import users_in
from prefixfleet.pipelines.training.outcome import Outcome
from prefixfleet.pipelines.training.plan import JobContext
from prefixfleet.pipelines.training.tally import Tally
from prefixfleet.registry import RegistryAddress, UserKey

log = logging.getLogger("prefixfleet")
QUEUED_PER_ACTOR = 2
POLL_SECONDS = 1.0
NODES_EVERY_S = 2.0  # how often the driver looks for dead nodes
CHUNK_ATTEMPTS = 3  # actors a chunk may be given to, the lost ones included
ACTOR_NAME = "prefixfleet-trainer"

Progress = Callable[[Tally, int], None]  # (the outcomes so far, users done in running chunks)


@dataclass(frozen=True)
class Chunk:
    """Rows [start, stop) of an ingested block: one actor call."""

    block: ray.ObjectRef
    start: int
    stop: int

    def keys(self) -> list[UserKey]:
        """Its users' keys (fetching the block here: only when the chunk never ran)."""
        return [user.key for user in users_in(ray.get(self.block), self.start, self.stop)]


def chunks(blocks: Iterable[tuple[ray.ObjectRef, int]], users: int, actors: int, pack_size: int,
           isolated: bool) -> Iterator[Chunk]:
    """Chunks of users, one actor call each. Isolated: one user per call. Packed: guided
    scheduling — a few packs per call while much is left, smaller calls towards the end so all
    actors finish together — and never fewer chunks than actors while users are left. A chunk
    never spans two blocks (`users`: how many there are in all, to size the chunks)."""
    left = users
    for block, rows in blocks:
        start = 0
        while start < rows:
            if isolated:
                size = 1
            else:
                size = min(4 * pack_size, max(min(pack_size, -(-left // actors)), -(-left // (2 * actors))))
            size = max(1, min(size, rows - start))
            yield Chunk(block, start, start + size)
            start += size
            left = max(1, left - size)


def _short(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None) or exc
    lines = [line for line in str(cause).splitlines() if line.strip()]
    return f"{type(cause).__name__}: {lines[-1] if lines else ''}".strip()


class Fleet:
    """Trainer actors for one job, spread over the nodes. Use as a context manager: actors are
    killed on exit."""

    def __init__(self, backbone: str, registry: RegistryAddress, *, actors: int, cpus: float = 1.0,
                 gpus: float = 0.0, env: dict[str, str] | None = None) -> None:
        self.backbone, self.registry = backbone, registry
        token = uuid.uuid4().hex[:8]
        self.actors = [
            TrainerActor.options(name=f"{ACTOR_NAME}-{token}-{i}", num_cpus=cpus, num_gpus=gpus,
                                 scheduling_strategy="SPREAD", runtime_env={"env_vars": env} if env else None)
            .remote(backbone, registry, "cuda" if gpus else None)
            for i in range(actors)
        ]
        self.alive = set(range(actors))
        self.nodes = [""] * actors  # the node each actor runs on, once it has started
        self._nodes_checked = 0.0

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc: object) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)

    def fingerprint(self) -> str:
        """The backbone fingerprint, after every actor has loaded it (and said where it runs)."""
        try:
            prints = set(ray.get([a.fingerprint.remote() for a in self.actors]))
            self.nodes = ray.get([a.node.remote() for a in self.actors])
        except RayError as exc:
            raise JobError(f"trainer actors could not load the backbone: {_short(exc)}") from exc
        if len(prints) != 1:
            raise JobError("trainer actors loaded different backbones from the same id; pin a revision or a path")
        return prints.pop()

    @property
    def node_count(self) -> int:
        """How many nodes the live actors run on."""
        return len({self.nodes[i] for i in self.alive})

    def check_unchanged(self) -> None:
        """Invariant 6: every live actor's backbone weights are still the ones it loaded."""
        if not all(ray.get([self.actors[i].unchanged.remote() for i in self.alive])):
            raise JobError("the backbone's weights changed during the job")

    def run(self, work: Iterator[Chunk], context: JobContext, tally: Tally, progress: Progress) -> None:
        """Train every chunk of `work` (taken as actors free up), each outcome into `tally`."""
        waiting = iter(work)
        again: deque[tuple[Chunk, int]] = deque()  # chunks of lost actors, and the attempts they had
        running: dict[ray.ObjectRef, tuple[int, Chunk, int]] = {}
        queued = [0] * len(self.actors)
        while True:
            stop = "" if self.alive else "no trainer actor is left"
            if tally.down is not None:
                stop = tally.down.unavailable_reason
            while not stop and (free := [i for i in self.alive if queued[i] < QUEUED_PER_ACTOR]):
                chunk, attempts = again.popleft() if again else (next(waiting, None), 0)
                if chunk is None:
                    break
                index = min(free, key=queued.__getitem__)
                running[self.actors[index].train.remote(chunk.block, chunk.start, chunk.stop, context)] = (
                    index, chunk, attempts + 1)
                queued[index] += 1
            if stop:
                make = Outcome.not_started if tally.down is not None else Outcome.failed
                for chunk in [*(c for c, _ in again), *waiting]:
                    tally.add(make(key, stop) for key in chunk.keys())
                again.clear()
            if not running:
                return
            ready, _ = ray.wait(list(running), num_returns=1, timeout=POLL_SECONDS)
            for ref in ready:
                index, chunk, attempts = running.pop(ref)
                queued[index] -= 1
                tally.add(self._collect(ref, index, chunk, attempts, again))
            self._drop_actors_of_dead_nodes()
            progress(tally, self._in_progress({i for i, _, _ in running.values()}))

    def _collect(self, ref: ray.ObjectRef, index: int, chunk: Chunk, attempts: int,
                 again: deque[tuple[Chunk, int]]) -> list[Outcome]:
        """A chunk's outcomes; a chunk whose actor was lost goes to `again` while it has attempts left."""
        try:
            return ray.get(ref)
        except RayActorError as exc:
            if not isinstance(exc, ActorUnavailableError):
                self._drop(index, _short(exc))
            if attempts < CHUNK_ATTEMPTS and self.alive:
                again.append((chunk, attempts))
                return []
            return [Outcome.failed(key, f"trainer actor lost, {attempts} attempt(s) spent: {_short(exc)}")
                    for key in chunk.keys()]
        except RayError as exc:
            return [Outcome.failed(key, f"chunk failed: {_short(exc)}") for key in chunk.keys()]

    def _drop(self, index: int, reason: str) -> None:
        if index in self.alive:
            self.alive.discard(index)
            log.warning("trainer actor %d lost (%s); its chunks go to the %d left", index, reason, len(self.alive))

    def _drop_actors_of_dead_nodes(self) -> None:
        """Kill the actors whose node died: their chunks then fail in `_collect` and go elsewhere."""
        if time.monotonic() - self._nodes_checked < NODES_EVERY_S:
            return
        self._nodes_checked = time.monotonic()
        dead = {node["NodeID"] for node in ray.nodes() if not node["Alive"]}
        for index in sorted(i for i in self.alive if self.nodes[i] in dead):
            ray.kill(self.actors[index], no_restart=True)
            self._drop(index, f"its node {self.nodes[index][:12]} died")

    def _in_progress(self, busy: set[int]) -> int:
        """Users finished inside chunks still running (actors that do not answer at once count 0);
        the answers also say where each actor runs now (a restarted actor may have moved)."""
        refs = {self.actors[i].status.remote(): i for i in busy}
        if not refs:
            return 0
        ready, _ = ray.wait(list(refs), num_returns=len(refs), timeout=0.2)
        done = 0
        for ref in ready:
            try:
                status = ray.get(ref)
            except RayError:
                continue
            done += status["chunk_done"]
            self.nodes[refs[ref]] = status["node"]
        return done
