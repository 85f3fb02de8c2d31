"""The trainer actor: loads the frozen backbone once, then plans and trains many users' chunks packed.

Actors publish their users themselves rather than returning artifacts to the driver: publish
throughput grows with the number of actors, artifact bytes never cross the cluster twice, and the
driver stays a light scheduler at millions of users. Publishing runs on a small thread pool so
registry latency overlaps training. Exactly once: before training a chunk the actor plans it,
looking each user up by (data fingerprint, spec, training settings, backbone fingerprint); a chunk retried after
a crash finishes the users it had already published (including their promotion) instead of
training them again, and the registry's publish is itself idempotent on that identity. A chunk
arrives as a range of rows of an ingested block: the users' examples go from Ray's object store
to the actor without passing through the driver.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor

import pyarrow as pa
import ray

from prefixfleet.pipelines.training.data import UserData
from prefixfleet.pipelines.training.ingest import users_in
from prefixfleet.pipelines.training.outcome import Outcome
from prefixfleet.pipelines.training.plan import JobContext, Planner, UserTask
from prefixfleet.pipelines.training.publisher import Measure, Production, Publisher
from prefixfleet.registry import RegistryAddress, Unavailable
from prefixfleet.workers.backbone import load_backbone, weights_checksum
from prefixfleet.workers.prefix import PrefixTensors
from prefixfleet.workers.trainer import UserRequest, UserResult, evaluate, prepare, train_users

PUBLISH_THREADS = 4


class UserTrainer:
    """Plain class; `TrainerActor` below is its Ray actor. One instance per process."""

    def __init__(self, backbone: str, registry: RegistryAddress, device: str | None = None) -> None:
        self.backbone = load_backbone(backbone, device=device)
        self.checksum = weights_checksum(self.backbone.model)
        self.publisher = Publisher(registry.open(), self.backbone.fingerprint)
        self.planner = Planner(self.publisher.registry, self.backbone.fingerprint)
        self.pool = ThreadPoolExecutor(PUBLISH_THREADS, thread_name_prefix="publish")
        self.lock = threading.Lock()
        self.node_id = ray.get_runtime_context().get_node_id() if ray.is_initialized() else ""
        self.counts = {"pid": os.getpid(), "chunk_size": 0, "chunk_planned": 0, "chunk_done": 0}

    def fingerprint(self) -> str:
        return self.backbone.fingerprint

    def node(self) -> str:
        """The Ray node this actor runs on."""
        return self.node_id

    def close(self) -> None:
        """Wait for publishes in flight and release the registry (actors just end instead)."""
        self.pool.shutdown(wait=True)
        self.publisher.close()

    def unchanged(self) -> bool:
        """Invariant 6: the backbone's weights are bit-identical to when they were loaded."""
        return weights_checksum(self.backbone.model) == self.checksum

    @ray.method(concurrency_group="status")
    def status(self) -> dict[str, int | str]:
        """Answered while a chunk trains: pid, node and how far the current chunk is."""
        with self.lock:
            return {**self.counts, "node": self.node_id}

    def train(self, block: pa.Table, start: int, stop: int, context: JobContext) -> list[Outcome]:
        """The users of rows [start, stop) of an ingested block, through `train_users`."""
        return self.train_users(users_in(block, start, stop), context)

    def train_users(self, users: list[UserData], context: JobContext) -> list[Outcome]:
        """Plan, train, gate and publish a chunk of users; one outcome per user, in order. When a
        server stays unreachable past the outage deadline, the users not trained yet are not started."""
        with self.lock:
            self.counts.update(chunk_size=len(users), chunk_planned=0, chunk_done=0)
        outcomes: list[Outcome | Future[Outcome] | None] = [None] * len(users)
        tasks: list[UserTask] = []
        requests: list[UserRequest] = []
        owners: list[int] = []  # requests[i] trains users[owners[i]]
        productions: list[Production] = []
        down: Unavailable | None = None
        try:
            published = self.planner.lookup(users)
        except Unavailable as exc:
            published, down = {}, exc
        for index, user in enumerate(users):
            if down is not None:
                outcomes[index] = Outcome.not_started(user.key, str(down))
                self._done()
                continue
            try:
                task = self.planner.decide(user, context, published.get(user.key))
                if isinstance(task, UserTask):  # a skip writes nothing: only users to train are checked
                    self.publisher.check_not_forgotten(user.key, context)
                with self.lock:
                    self.counts["chunk_planned"] += 1
                if not isinstance(task, UserTask) or context.dry_run:
                    outcomes[index] = Outcome.planned(task)
                    self._done()
                    continue
                existing = self.publisher.existing(task)
                if existing is not None:
                    outcomes[index] = self.publisher.finish_gate(task, existing, context,
                                                                 self._measure(self._request(task, context)))
                    self._done()
                    continue
                request = self._request(task, context, self.publisher.warm_start(task))
                productions.append(self.publisher.production(task.key, self._measure(request)))
                requests.append(request)
                tasks.append(task)
                owners.append(index)
            except Exception as exc:  # noqa: BLE001 - one user's failure stays with that user
                outcomes[index] = Outcome.from_error(user.key, exc)
                if isinstance(exc, Unavailable):
                    down = exc
                self._done()
        if down is not None:
            for index in owners:
                outcomes[index] = Outcome.not_started(users[index].key, str(down))
                self._done()
            owners, requests = [], []

        def on_result(position: int, result: UserResult) -> None:
            outcomes[owners[position]] = self.pool.submit(self._publish, tasks[position], result,
                                                          productions[position], context)

        train_users(self.backbone, requests, pack_size=context.pack_size, on_result=on_result)
        return [item.result() if isinstance(item, Future) else item for item in outcomes]

    def _publish(self, task: UserTask, result: UserResult, production: Production, context: JobContext) -> Outcome:
        try:
            return self.publisher.publish(task, result, production, context)
        except Exception as exc:  # noqa: BLE001 - one user's failure stays with that user
            return Outcome.from_error(task.key, exc)
        finally:
            self._done()

    def _done(self) -> None:
        with self.lock:
            self.counts["chunk_done"] += 1

    @staticmethod
    def _request(task: UserTask, context: JobContext, start: PrefixTensors | None = None) -> UserRequest:
        """The workers' request; its name (errors, the user's seed) is "namespace/user_id"."""
        name = f"{task.key.namespace}/{task.key.user_id}"
        return UserRequest(name, task.train, task.spec, context.config, task.eval or None, start=start)

    def _measure(self, request: UserRequest) -> Measure:
        """A prefix's eval loss on this request's eval split."""
        def measure(tensors: PrefixTensors) -> float:
            _, evals = prepare(self.backbone, request)
            loss, = evaluate(self.backbone, [(tensors, evals)])
            return loss
        return measure


# Restarted after a crash (the backbone is reloaded) and the interrupted chunk is retried on it.
TrainerActor = ray.remote(max_restarts=3, max_task_retries=3, concurrency_groups={"status": 1})(UserTrainer)
