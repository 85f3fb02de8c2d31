"""Prefixes for serving, in tiers: device memory (decoded tensors in `served_form`: a soft prompt
as its keys/values, computed once; LRU bounded in bytes) → host
memory (verified artifact bytes, LRU bounded in bytes) → the registry (resolve + fetch).

Every request resolves the user's alias through `Registry.resolve`, whose own short-lived cache
answers without a round trip most of the time. Tiers are keyed by (namespace, user, sha256), so a
promoted version is a new key and is loaded on first use, while the old one ages out of the LRU.
Staleness bound: a promote made by any process is served within 2 × the registry's `resolve_ttl`
(1 s by default) plus one MLflow round trip; a promote made through the same Registry object is
served at once.

A prefix bound to another backbone than the served one is refused (BackboneMismatch) before any
byte is fetched, and again when its bytes are decoded: never a fallback.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

from cachetools import LRUCache

from prefixfleet.registry import Registry, UserKey, VersionRef
from prefixfleet.workers.artifact import deserialize
from prefixfleet.workers.backbone import Backbone
from prefixfleet.workers.errors import BackboneMismatch
from prefixfleet.workers.prefix import PrefixTensors, check_shapes, expected_shapes, served_form

ContentKey = tuple[str, str, str]  # namespace, user_id, sha256


@dataclass(frozen=True)
class ServedPrefix:
    """A user's resolved version and its tensors on the backbone's device and dtype."""

    ref: VersionRef
    tensors: PrefixTensors

    @property
    def layout(self) -> tuple[tuple[str, tuple[int, ...]], ...]:
        """Rows of one batch must share this (stack names and shapes)."""
        return tuple(sorted((name, tuple(t.shape)) for name, t in self.tensors.items()))

    @property
    def num_virtual_tokens(self) -> int:
        return int(self.ref.spec["num_virtual_tokens"])


@dataclass
class CacheStats:
    device_hits: int = 0
    host_hits: int = 0
    registry_fetches: int = 0
    refused: int = 0


def tensors_nbytes(tensors: PrefixTensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


class PrefixCache:
    """Thread-safe; concurrent misses for one prefix load it once."""

    def __init__(self, registry: Registry, backbone: Backbone, *, device_bytes: int = 512 << 20,
                 host_bytes: int = 1 << 30, alias: str = "production") -> None:
        self.registry, self.backbone, self.alias = registry, backbone, alias
        self.fingerprint = backbone.fingerprint
        self._device: LRUCache[ContentKey, PrefixTensors] = LRUCache(device_bytes, getsizeof=tensors_nbytes)
        self._host: LRUCache[ContentKey, bytes] = LRUCache(host_bytes, getsizeof=len)
        self._loading: dict[ContentKey, threading.Lock] = {}
        self._lock = threading.Lock()
        self.stats = CacheStats()

    def get(self, key: UserKey) -> ServedPrefix:
        """The user's current version, ready to batch. Raises registry.NotFound for an unknown
        user, BackboneMismatch for a prefix of another backbone."""
        ref = self.registry.resolve(key, self.alias)
        if ref.backbone_fingerprint != self.fingerprint:
            with self._lock:
                self.stats.refused += 1
            raise BackboneMismatch(
                f"prefix version {ref.version} of {key} was trained on backbone {ref.backbone_fingerprint[:12]}…, "
                f"this server runs {self.fingerprint[:12]}… ({self.backbone.name_or_path}); it is never used here"
            )
        return ServedPrefix(ref, self._tensors(ref))

    def _tensors(self, ref: VersionRef) -> PrefixTensors:
        content = (ref.namespace, ref.user_id, ref.sha256)
        with self._lock:
            if (hit := self._device.get(content)) is not None:
                self.stats.device_hits += 1
                return hit
            loading = self._loading.setdefault(content, threading.Lock())
        with loading:
            try:
                with self._lock:
                    if (hit := self._device.get(content)) is not None:
                        self.stats.device_hits += 1
                        return hit
                tensors = self._decode(self._bytes(ref, content))
                with self._lock:
                    if tensors_nbytes(tensors) <= self._device.maxsize:
                        self._device[content] = tensors
                return tensors
            finally:
                with self._lock:
                    self._loading.pop(content, None)

    def _bytes(self, ref: VersionRef, content: ContentKey) -> bytes:
        with self._lock:
            if (data := self._host.get(content)) is not None:
                self.stats.host_hits += 1
                return data
        data = self.registry.fetch_ref(ref)  # verified: sha256, size, user binding, fingerprints
        with self._lock:
            self.stats.registry_fetches += 1
            if len(data) <= self._host.maxsize:
                self._host[content] = data
        return data

    def _decode(self, data: bytes) -> PrefixTensors:
        tensors, meta = deserialize(data, backbone_fingerprint=self.fingerprint)
        check_shapes(tensors, expected_shapes(self.backbone, meta.spec))
        model = self.backbone.model
        return served_form(self.backbone, {name: t.to(self.backbone.device, model.dtype) for name, t in tensors.items()})

    def usage(self) -> dict[str, int]:
        """Bytes held per tier and how often each tier answered."""
        with self._lock:
            s = self.stats
            return {"device_bytes": int(self._device.currsize), "host_bytes": int(self._host.currsize),
                    "device_hits": s.device_hits, "host_hits": s.host_hits,
                    "registry_fetches": s.registry_fetches, "refused": s.refused}

