"""How many trainer actors a job starts, and the jobs refused before anything waits on resources."""
from __future__ import annotations

from pathlib import Path

import pytest

from prefixfleet.pipelines.placement import check_replicas, holds, plan_actors
from prefixfleet.pipelines.training.errors import JobError
from prefixfleet.pipelines.training.job import JobRequest, run_job
from prefixfleet.registry import Registry
from tests.fixtures.backbones import TinyBackbones
from tests.pipelines.pipeline_support import BACKBONE, synthetic, write_jsonl

HEAD = {"CPU": 2.0, "memory": 1e9}
GPU_NODE = {"CPU": 4.0, "GPU": 2.0}


def test_each_node_holds_whole_actors_and_fractions_share() -> None:
    assert holds({"CPU": 1.5}, 1.0, 0.0) == 1
    assert holds({"CPU": 1.0}, 0.1, 0.0) == 10  # not 9: float division
    assert holds(GPU_NODE, 1.0, 0.5) == 4
    assert holds(GPU_NODE, 1.0, 1.0) == 2
    assert holds(HEAD, 1.0, 1.0) == 0


def test_the_count_is_what_the_nodes_hold_not_the_sum_of_their_cpus() -> None:
    assert plan_actors([{"CPU": 1.5}, {"CPU": 1.5}], users=100, cpus=1.0, gpus=0.0) == 2  # the sum holds 3
    assert plan_actors([HEAD, GPU_NODE], users=100, cpus=1.0, gpus=0.0) == 6
    assert plan_actors([HEAD, GPU_NODE], users=100, cpus=1.0, gpus=1.0) == 2  # GPU actors only on the GPU node
    assert plan_actors([HEAD, GPU_NODE], users=3, cpus=1.0, gpus=0.0) == 3  # never more than users
    assert plan_actors([HEAD], users=0, cpus=1.0, gpus=0.0) == 1
    assert plan_actors([HEAD], users=5, cpus=0.0, gpus=0.0) == 5  # asks for nothing: one per user


def test_gpu_actors_on_a_cluster_without_gpus_are_refused_naming_the_option() -> None:
    with pytest.raises(JobError, match=r"--actor-gpus 1 asks for a GPU .* has none \(4 CPUs and 0 GPUs on 2 nodes\)"):
        plan_actors([HEAD, HEAD], users=10, cpus=1.0, gpus=1.0)


def test_an_actor_no_node_can_hold_is_refused_naming_the_largest_ask() -> None:
    with pytest.raises(JobError, match=r"asks for 5 CPU \+ 1 GPU, and no node .* \(6 CPUs and 2 GPUs on 2 nodes\)"):
        plan_actors([HEAD, GPU_NODE], users=10, cpus=5.0, gpus=1.0)
    with pytest.raises(JobError, match="no node"):
        plan_actors([], users=10, cpus=1.0, gpus=0.0)


def test_more_actors_than_the_nodes_hold_are_refused() -> None:
    assert plan_actors([HEAD], users=10, cpus=1.0, gpus=0.0, wanted=2) == 2
    assert plan_actors([HEAD], users=1, cpus=1.0, gpus=0.0, wanted=2) == 2  # asked for: kept
    with pytest.raises(JobError, match=r"--actors 3: the Ray cluster's nodes hold 2 trainer actors of 1 CPU each"):
        plan_actors([HEAD], users=10, cpus=1.0, gpus=0.0, wanted=3)
    for bad in ({"wanted": 0}, {"cpus": -1.0}):
        with pytest.raises(JobError, match="--actor"):
            plan_actors([HEAD], users=10, **{"cpus": 1.0, "gpus": 0.0, **bad})


def test_serve_replicas_share_a_gpu_by_fractions_and_a_missing_gpu_is_named() -> None:
    check_replicas([HEAD, GPU_NODE], replicas=4, cpus=1.0, gpus=0.5)  # two cards, two replicas on each
    with pytest.raises(JobError, match=r"--replicas 5: the Ray cluster's nodes hold 4 replicas of 1 CPU \+ 0.5 GPU"):
        check_replicas([HEAD, GPU_NODE], replicas=5, cpus=1.0, gpus=0.5)
    with pytest.raises(JobError, match=r"--replica-gpus 0.25 asks for a GPU per replica, and the Ray cluster has none"):
        check_replicas([HEAD], replicas=1, cpus=1.0, gpus=0.25)


@pytest.mark.ray
def test_a_gpu_job_on_a_cluster_without_gpus_fails_at_once_before_reading(
        tiny_backbones: TinyBackbones, local_ray: None, local_registry: Registry, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "data.jsonl", synthetic(2))
    request = JobRequest(str(tmp_path / "missing.jsonl"), tiny_backbones.path(**BACKBONE), actor_gpus=1.0,
                         progress=False)
    with pytest.raises(JobError, match=r"--actor-gpus 1 asks for a GPU per trainer actor, and the Ray cluster has none"):
        run_job(request, local_registry, tmp_path)  # the data is not even looked at: the path is missing
    with pytest.raises(JobError, match=r"--actors 5: the Ray cluster's nodes hold 2"):
        run_job(JobRequest(str(data), request.backbone, actors=5, progress=False), local_registry, tmp_path)
