"""The serving prefix cache: device → host → registry tiers, one load for concurrent misses, a
promote noticed, unknown users and prefixes of another backbone refused."""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from prefixfleet.pipelines.serving.cache import PrefixCache, tensors_nbytes
from prefixfleet.pipelines.serving.engine import Engine, RowSettings
from prefixfleet.registry import NotFound, Registry, UserKey
from prefixfleet.workers.decoding import prompt_ids
from prefixfleet.workers.errors import BackboneMismatch
from prefixfleet.workers.prefix import expected_shapes
from prefixfleet.workers.spec import PrefixSpec
from tests.pipelines.serving_support import NEW_TOKENS, PROMPTS, alone, publish_user, random_prefix

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def backbone(tiny_backbones):
    return tiny_backbones.load()


def test_tiers_answer_in_order_device_host_registry(local_registry, backbone):
    _, tensors_a = publish_user(local_registry, backbone, "ann", seed=1)
    publish_user(local_registry, backbone, "bob", seed=2)
    one_prefix = tensors_nbytes(tensors_a)
    cache = PrefixCache(local_registry, backbone, device_bytes=one_prefix, host_bytes=1 << 20)

    first = cache.get(UserKey("default", "ann"))
    assert cache.usage()["registry_fetches"] == 1
    assert all(torch.equal(first.tensors[k], tensors_a[k]) for k in tensors_a)
    assert cache.get(UserKey("default", "ann")).tensors is first.tensors
    assert cache.usage()["device_hits"] == 1

    cache.get(UserKey("default", "bob"))  # the device tier holds one prefix: ann moves out
    cache.get(UserKey("default", "ann"))  # … and comes back from host memory, not the registry
    usage = cache.usage()
    assert (usage["registry_fetches"], usage["host_hits"]) == (2, 1)
    assert usage["device_bytes"] <= one_prefix


def test_concurrent_misses_load_a_prefix_once(local_registry, backbone):
    publish_user(local_registry, backbone, "cy", seed=3)
    cache = PrefixCache(local_registry, backbone)
    with ThreadPoolExecutor(8) as pool:
        served = list(pool.map(lambda _: cache.get(UserKey("default", "cy")), range(16)))
    assert cache.usage()["registry_fetches"] == 1
    assert all(s.tensors is served[0].tensors for s in served)


def test_a_promote_elsewhere_is_noticed_within_the_resolution_ttl(local_registry_home, mlflow_db_template, backbone):
    from tests.fixtures.servers import make_local_registry

    serving = make_local_registry(local_registry_home, mlflow_db_template, resolve_ttl=0.2)
    other = Registry(serving.tracking_uri, serving.store_uri)  # another process: no shared cache
    try:
        v1, _ = publish_user(other, backbone, "dee", seed=4)
        cache = PrefixCache(serving, backbone)
        assert cache.get(UserKey("default", "dee")).ref.version == v1.version
        v2, tensors = publish_user(other, backbone, "dee", seed=5)
        deadline = time.monotonic() + 10
        while (served := cache.get(UserKey("default", "dee"))).ref.version != v2.version:
            assert time.monotonic() < deadline, "the promote was never noticed"
            time.sleep(0.05)
        assert all(torch.equal(served.tensors[k], tensors[k]) for k in tensors)
    finally:
        other.close()
        serving.close()


def test_unknown_user_is_not_found(local_registry, backbone):
    with pytest.raises(NotFound, match="nobody"):
        PrefixCache(local_registry, backbone).get(UserKey("default", "nobody"))


def test_prefix_of_another_backbone_is_refused_before_fetching(local_registry, backbone, tiny_backbones):
    other = tiny_backbones.load(seed=2)
    publish_user(local_registry, other, "eve", seed=6)
    cache = PrefixCache(local_registry, backbone)
    with pytest.raises(BackboneMismatch, match="never used"):
        cache.get(UserKey("default", "eve"))
    assert cache.usage()["registry_fetches"] == 0
    assert cache.usage()["refused"] == 1


def test_tensors_live_on_the_backbone_device_and_dtype(local_registry, backbone):
    publish_user(local_registry, backbone, "fay", seed=7)
    served = PrefixCache(local_registry, backbone).get(UserKey("default", "fay"))
    assert served.layout == (("decoder", tuple(random_prefix(backbone, 0)["decoder"].shape)),)
    assert all(t.device == backbone.device and t.dtype == backbone.model.dtype for t in served.tensors.values())


def test_a_soft_prompt_is_held_as_its_keys_and_values_and_served_as_alone(local_registry, backbone):
    spec = PrefixSpec(method="prompt", num_virtual_tokens=4)
    _, prompt = publish_user(local_registry, backbone, "gus", seed=3, spec=spec)
    cache = PrefixCache(local_registry, backbone)
    served = cache.get(UserKey("default", "gus"))
    assert served.layout == (("decoder", tuple(expected_shapes(backbone, PrefixSpec("ptuning-v2", 4))["decoder"])),)
    assert cache.get(UserKey("default", "gus")).tensors is served.tensors  # computed once, then a device hit
    engine = Engine(backbone)
    try:
        row = engine.submit(served.tensors, prompt_ids(backbone, PROMPTS[0]), RowSettings(NEW_TOKENS))
        assert row.future.result(timeout=60).text == alone(backbone, prompt, PROMPTS[0])
    finally:
        engine.close()
