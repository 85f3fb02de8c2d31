"""Helpers for the serving tests: a tiny backbone, users with published prefixes, and what
generating for one user alone gives."""
from __future__ import annotations

import torch

from prefixfleet.registry import Registry, UserKey, VersionRef
from prefixfleet.workers.artifact import ArtifactMeta, serialize
from prefixfleet.workers.backbone import Backbone
from prefixfleet.workers.generate import generate
from prefixfleet.workers.prefix import PrefixTensors, expected_shapes
from prefixfleet.workers.spec import PrefixSpec

SPEC = PrefixSpec(method="ptuning-v2", num_virtual_tokens=5)
PROMPTS = ("order 3 kite for Bo\n", "hi there", "order 9 lamp for Kim, and a longer note\n", "Dear Ana")
NEW_TOKENS = 8


def random_prefix(backbone: Backbone, seed: int, spec: PrefixSpec = SPEC) -> PrefixTensors:
    generator = torch.Generator().manual_seed(seed)
    return {name: torch.randn(shape, generator=generator) for name, shape in expected_shapes(backbone, spec).items()}


def artifact(backbone: Backbone, key: UserKey, tensors: PrefixTensors, *, spec: PrefixSpec = SPEC,
             fingerprint: str | None = None, data: str = "data") -> bytes:
    meta = ArtifactMeta(key.namespace, key.user_id, spec, fingerprint or backbone.fingerprint,
                        f"{data}:{key.user_id}", backbone=backbone.name_or_path)
    return serialize(tensors, meta)


def publish_user(registry: Registry, backbone: Backbone, user: str, *, seed: int, namespace: str = "default",
                 spec: PrefixSpec = SPEC, fingerprint: str | None = None) -> tuple[VersionRef, PrefixTensors]:
    """Publish a random prefix for `user` and make it production."""
    key, tensors = UserKey(namespace, user), random_prefix(backbone, seed, spec)
    ref = registry.publish(key, artifact(backbone, key, tensors, spec=spec, fingerprint=fingerprint, data=f"seed{seed}"))
    return registry.promote(key, ref.version), tensors


def publish_all(registry: Registry, backbone: Backbone, users: list[tuple[str, str]]) -> dict[str, PrefixTensors]:
    """Publish a random prefix for each (namespace, user), seeded by its place in `users`: the
    production tensors under "namespace/user"."""
    return {f"{ns}/{user}": publish_user(registry, backbone, user, seed=i, namespace=ns)[1]
            for i, (ns, user) in enumerate(users)}


def alone(backbone: Backbone, tensors: PrefixTensors, prompt: str, max_new_tokens: int = NEW_TOKENS) -> str:
    return generate(backbone, [tensors], [prompt], max_new_tokens=max_new_tokens)[0]


def each_alone(backbone: Backbone, tensors: dict[str, PrefixTensors], jobs: list[tuple[str, str]]) -> list[str]:
    """What each (user, prompt) of `jobs` gets alone, once it is checked that the users' prefixes
    answer one prompt differently: a row served another user's prefix could not pass unseen."""
    assert len({alone(backbone, t, jobs[0][1]) for t in tensors.values()}) > 1
    return [alone(backbone, tensors[user], prompt) for user, prompt in jobs]
