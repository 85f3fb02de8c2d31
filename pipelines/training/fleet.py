"""The driver's side of a job: start trainer actors, feed them chunks of users, count outcomes.

Chunks are ranges of rows of the ingested blocks: the driver holds block references, never the
users' data, and takes the next chunk only when an actor can queue it. Each actor has at most two
chunks queued, so it starts the next chunk the moment one ends. A chunk
interrupted by a crash is retried by Ray on the restarted actor (`max_task_retries`); an actor
that dies for good (its restarts spent) fails only the users of its chunks, with the reason. Once
a user fails because a server stayed unreachable past the outage deadline, no chunk is started:
the chunks waiting are reported not started, for a re-run to finish.
"""
from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import ray
from ray.exceptions import RayActorError, RayError

from prefixfleet.pipelines.training.actor import TrainerActor
from prefixfleet.pipelines.training.errors import JobError
from prefixfleet.pipelines.training.ingest import users_in
from prefixfleet.pipelines.training.outcome import Outcome
from prefixfleet.pipelines.training.plan import JobContext
from prefixfleet.pipelines.training.tally import Tally
from prefixfleet.registry import RegistryAddress, UserKey

QUEUED_PER_ACTOR = 2
POLL_SECONDS = 1.0
ACTOR_NAME = "prefixfleet-trainer"

Progress = Callable[[Tally, int], None]  # (the outcomes so far, users done in running chunks)


def actor_count(users: int, cpus: float, gpus: float) -> int:
    """As many actors as the cluster's CPUs (or GPUs) hold, never more than there are users."""
    total = ray.cluster_resources()
    fits = [int(total.get("CPU", 1) // cpus)] if cpus else []
    if gpus:
        fits.append(int(total.get("GPU", 0) // gpus))
    return max(1, min([*fits, users]))


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
    """Trainer actors for one job. Use as a context manager: actors are killed on exit."""

    def __init__(self, backbone: str, registry: RegistryAddress, *, actors: int, cpus: float = 1.0,
                 gpus: float = 0.0, env: dict[str, str] | None = None) -> None:
        self.backbone, self.registry = backbone, registry
        token = uuid.uuid4().hex[:8]
        self.actors = [
            TrainerActor.options(name=f"{ACTOR_NAME}-{token}-{i}", num_cpus=cpus, num_gpus=gpus,
                                 runtime_env={"env_vars": env} if env else None)
            .remote(backbone, registry, "cuda" if gpus else None)
            for i in range(actors)
        ]
        self.alive = set(range(actors))

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc: object) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)

    def fingerprint(self) -> str:
        """The backbone fingerprint, after every actor has loaded it."""
        try:
            prints = set(ray.get([a.fingerprint.remote() for a in self.actors]))
        except RayError as exc:
            raise JobError(f"trainer actors could not load the backbone: {_short(exc)}") from exc
        if len(prints) != 1:
            raise JobError("trainer actors loaded different backbones from the same id; pin a revision or a path")
        return prints.pop()

    def check_unchanged(self) -> None:
        """Invariant 6: every live actor's backbone weights are still the ones it loaded."""
        if not all(ray.get([self.actors[i].unchanged.remote() for i in self.alive])):
            raise JobError("the backbone's weights changed during the job")

    def run(self, work: Iterator[Chunk], context: JobContext, tally: Tally, progress: Progress) -> None:
        """Train every chunk of `work` (taken as actors free up), each outcome into `tally`."""
        waiting = iter(work)
        running: dict[ray.ObjectRef, tuple[int, Chunk]] = {}
        queued = [0] * len(self.actors)
        while True:
            stop = "" if self.alive else "no trainer actor is left"
            if tally.down is not None:
                stop = tally.down.unavailable_reason
            while not stop and (free := [i for i in self.alive if queued[i] < QUEUED_PER_ACTOR]):
                chunk = next(waiting, None)
                if chunk is None:
                    break
                index = min(free, key=queued.__getitem__)
                running[self.actors[index].train.remote(chunk.block, chunk.start, chunk.stop, context)] = (index, chunk)
                queued[index] += 1
            if stop:
                make = Outcome.not_started if tally.down is not None else Outcome.failed
                for chunk in waiting:
                    tally.add(make(key, stop) for key in chunk.keys())
            if not running:
                return
            ready, _ = ray.wait(list(running), num_returns=1, timeout=POLL_SECONDS)
            for ref in ready:
                index, chunk = running.pop(ref)
                queued[index] -= 1
                tally.add(self._collect(ref, index, chunk))
            progress(tally, self._in_progress({i for i, _ in running.values()}))

    def _collect(self, ref: ray.ObjectRef, index: int, chunk: Chunk) -> list[Outcome]:
        try:
            return ray.get(ref)
        except RayActorError as exc:
            self.alive.discard(index)
            return [Outcome.failed(key, f"trainer actor died and was not restarted: {_short(exc)}")
                    for key in chunk.keys()]
        except RayError as exc:
            return [Outcome.failed(key, f"chunk failed: {_short(exc)}") for key in chunk.keys()]

    def _in_progress(self, busy: set[int]) -> int:
        """Users finished inside chunks still running (actors that do not answer at once count 0)."""
        refs = [self.actors[i].status.remote() for i in busy]
        if not refs:
            return 0
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0.2)
        done = 0
        for ref in ready:
            try:
                done += ray.get(ref)["chunk_done"]
            except RayError:
                pass
        return done
