"""How many trainer actors (or Serve replicas) the Ray cluster's nodes hold, decided before any
is started.

An actor is placed on one node, so what counts is what each node has, not the cluster's sum: two
nodes with 1.5 CPUs each hold two 1-CPU actors, not three; one GPU holds two replicas of 0.5 GPU.
An actor that no node can hold would wait for resources forever; the job (or `serve --ray`)
refuses it at once instead, naming what it asked for and what the nodes have. The count is taken
from the nodes up when it starts (an autoscaler's future nodes are not counted).
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import ray

from prefixfleet.pipelines.training.errors import JobError

EPSILON = 1e-9  # resources are floats: 1.0 / 0.1 must hold 10 actors, not 9


def holds(resources: Mapping[str, float], cpus: float, gpus: float) -> float:
    """How many actors of `cpus` CPUs and `gpus` GPUs fit in one node's `resources` (unbounded
    when they ask for neither)."""
    fits = [math.floor(resources.get(name, 0.0) / need + EPSILON) for name, need in (("CPU", cpus), ("GPU", gpus))
            if need > 0]
    return min(fits) if fits else math.inf


def _describe(nodes: list[Mapping[str, float]]) -> str:
    cpus = sum(n.get("CPU", 0.0) for n in nodes)
    gpus = sum(n.get("GPU", 0.0) for n in nodes)
    return f"{cpus:g} CPUs and {gpus:g} GPUs on {len(nodes)} node{'s' if len(nodes) != 1 else ''}"


def _asked(cpus: float, gpus: float) -> str:
    parts = [f"{cpus:g} CPU" if cpus else "", f"{gpus:g} GPU" if gpus else ""]
    return " + ".join(p for p in parts if p) or "nothing"


def plan_actors(nodes: Iterable[Mapping[str, float]], users: int, cpus: float, gpus: float,
                wanted: int | None = None) -> int:
    """The number of trainer actors for `users` users on nodes with these total resources:
    `wanted` when given and the nodes hold it, else as many as they hold, at most one per user.
    Raises JobError when no node can hold one actor, or the nodes hold fewer than `wanted`."""
    nodes = list(nodes)
    if cpus < 0 or gpus < 0:
        raise JobError(f"--actor-cpus and --actor-gpus cannot be negative (got {cpus:g} and {gpus:g})")
    held = sum(holds(n, cpus, gpus) for n in nodes)
    if held == 0:
        if gpus and not any(n.get("GPU", 0.0) for n in nodes):
            raise JobError(f"--actor-gpus {gpus:g} asks for a GPU per trainer actor, and the Ray cluster has "
                           f"none ({_describe(nodes)}); drop --actor-gpus or add GPU nodes")
        raise JobError(f"a trainer actor asks for {_asked(cpus, gpus)}, and no node of the Ray cluster has that "
                       f"much ({_describe(nodes)}); lower --actor-cpus / --actor-gpus or add nodes")
    if wanted is not None:
        if wanted < 1:
            raise JobError(f"--actors must be at least 1 (got {wanted})")
        if wanted > held:
            raise JobError(f"--actors {wanted}: the Ray cluster's nodes hold {held} trainer actors of "
                           f"{_asked(cpus, gpus)} each ({_describe(nodes)}); ask for fewer or add nodes")
        return wanted
    return int(max(1, min(held, users)))


def check_replicas(nodes: Iterable[Mapping[str, float]], replicas: int, cpus: float, gpus: float) -> None:
    """Raise JobError unless the nodes hold `replicas` Serve replicas of `cpus` CPUs and `gpus`
    GPUs each (a fraction of a GPU shares one card)."""
    nodes = list(nodes)
    held = sum(holds(n, cpus, gpus) for n in nodes)
    if held >= replicas:
        return
    if gpus and not any(n.get("GPU", 0.0) for n in nodes):
        raise JobError(f"--replica-gpus {gpus:g} asks for a GPU per replica, and the Ray cluster has none "
                       f"({_describe(nodes)}); drop --replica-gpus or add GPU nodes")
    raise JobError(f"--replicas {replicas}: the Ray cluster's nodes hold {held} replica{'s' if held != 1 else ''} of "
                   f"{_asked(cpus, gpus)} each ({_describe(nodes)}); ask for fewer, or less per replica")


def node_resources() -> list[dict[str, float]]:
    """Each live node's total resources, from the connected Ray cluster."""
    return [node["Resources"] for node in ray.nodes() if node["Alive"]]
