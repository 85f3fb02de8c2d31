"""Tombstones: how a `forget` outlives the work that began before it.

Each `forget` leaves one tombstone in the namespace's ``_erasure/`` folder of the object store,
under a keyed hash of the user id (HMAC-SHA256 with a random per-namespace secret kept beside
it), so it holds no id. Work that began before a forget knows the tombstones of that moment (an
ErasureSnapshot, taken by a job at its start, or by a publish when it begins); finding one more
means the user was forgotten meanwhile, and that work must leave nothing of the user behind.

The same secret makes the user's pseudonym: how job runs name users, so that their stored
records keep no id to erase.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property

from prefixfleet.registry.errors import RegistryError
from prefixfleet.registry.keys import UserKey
from prefixfleet.registry.store import ObjectStore

ERASURE_DIR = "_erasure"  # beside the two-hex-digit shard folders, never one of them
_SECRET = "secret"
_FORGOTTEN = "forgotten"
ERASURE_KEY = re.compile(rf"[a-z0-9][a-z0-9_-]*/{ERASURE_DIR}/(?:{_SECRET}|{_FORGOTTEN}/[0-9a-f]{{64}}/[0-9a-f]{{32}})")


class Forgotten(RegistryError):
    """The user was forgotten after the work behind a publish began: nothing of it was kept."""


@dataclass(frozen=True)
class ErasureSnapshot:
    """The tombstones of some namespaces at one moment: what work begun then already knew."""

    namespaces: frozenset[str]
    tombstones: frozenset[str]  # object keys

    def in_folder(self, folder: str) -> frozenset[str]:
        """The tombstones of one user's folder (a dictionary look-up, not a scan per publish)."""
        return self._by_folder.get(folder, frozenset())

    @cached_property
    def _by_folder(self) -> dict[str, frozenset[str]]:
        grouped: defaultdict[str, set[str]] = defaultdict(set)
        for tombstone in self.tombstones:
            grouped[tombstone.rsplit("/", 1)[0]].add(tombstone)
        return {folder: frozenset(keys) for folder, keys in grouped.items()}


class Tombstones:
    """Tombstones and pseudonyms of one object store. Thread-safe."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store
        self._secrets: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def record(self, key: UserKey) -> str:
        """Leave a new tombstone for `key` (one per forget, so each is news to earlier work)."""
        tombstone = f"{self._folder(key, self._secret(key.namespace, create=True))}/{uuid.uuid4().hex}"
        self.store.put(tombstone, json.dumps({"forgotten_at": time.time()}).encode())
        return tombstone

    def snapshot(self, namespaces: Iterable[str]) -> ErasureSnapshot:
        """Every tombstone of these namespaces now. Makes their secrets if need be: the job's
        workers then read each secret once, not once per check while none exists."""
        spaces = frozenset(namespaces)
        for namespace in sorted(spaces):
            self._secret(namespace, create=True)
        found = frozenset(k for ns in sorted(spaces) for k, _ in self.store.list(f"{ns}/{ERASURE_DIR}/{_FORGOTTEN}"))
        return ErasureSnapshot(spaces, found)

    def known(self, key: UserKey, snapshot: ErasureSnapshot | None = None) -> frozenset[str]:
        """The user's tombstones as `snapshot` saw them (read now when there is none)."""
        if snapshot is None:
            return self._current(key)
        if key.namespace not in snapshot.namespaces:
            raise ValueError(f"the erasure snapshot does not cover namespace {key.namespace!r}")
        folder = self._folder(key, self._secret(key.namespace))
        return snapshot.in_folder(folder) if folder else frozenset()

    def forgotten_since(self, key: UserKey, known: frozenset[str]) -> bool:
        """Whether the user has a tombstone that `known` lacks: forgotten since then."""
        return not self._current(key) <= known

    def pseudonym(self, key: UserKey) -> str:
        """A stable name for the user that holds no id (and is not its tombstone's name)."""
        return "u-" + _digest(self._secret(key.namespace, create=True), key, b"pseudonym")[:24]

    def _current(self, key: UserKey) -> frozenset[str]:
        folder = self._folder(key, self._secret(key.namespace))
        return frozenset(k for k, _ in self.store.list(folder)) if folder else frozenset()

    @staticmethod
    def _folder(key: UserKey, secret: bytes | None) -> str | None:
        """Where the user's tombstones go; None while the namespace has no secret (no forget yet)."""
        if secret is None:
            return None
        return f"{key.namespace}/{ERASURE_DIR}/{_FORGOTTEN}/{_digest(secret, key, b'tombstone')}"

    def _secret(self, namespace: str, *, create: bool = False) -> bytes | None:
        """The namespace's secret; made (`create`) by the first forget or pseudonym that needs one,
        with a create-once put read back, so racing makers agree on the stored one."""
        with self._lock:
            if namespace in self._secrets:
                return self._secrets[namespace]
        where = f"{namespace}/{ERASURE_DIR}/{_SECRET}"
        stored = self.store.get(where)
        if stored is None and create:
            self.store.put(where, secrets.token_bytes(32))
            stored = self.store.get(where)
            if not stored:
                raise RegistryError(f"the erasure secret of namespace {namespace!r} could not be stored")
        if stored is None:
            return None
        with self._lock:
            return self._secrets.setdefault(namespace, stored)


def _digest(secret: bytes, key: UserKey, purpose: bytes) -> str:
    return hmac.new(secret, purpose + b"\0" + key.user_id.encode(), hashlib.sha256).hexdigest()
