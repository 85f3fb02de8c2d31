"""fsck (consistency of MLflow records and stored artifacts) and gc (version retention).

A publish writes its artifact before it creates its version, so an artifact no version refers to
is an orphan only once it is older than any publish in flight can be: fsck leaves artifacts
younger than `grace_s` alone (and lists them), so `fsck --repair` is safe beside live publishes.
"""
from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from itertools import islice
from typing import Any

from prefixfleet.registry import refs
from prefixfleet.registry.catalog import Missing, ModelRecord, VersionRecord
from prefixfleet.registry.catalog.base import VERSIONS_PER_PAGE, models_named, versions_named
from prefixfleet.registry.erasure import ERASURE_KEY
from prefixfleet.registry.errors import IntegrityError
from prefixfleet.registry.header import read_header
from prefixfleet.registry.keys import SHA256_DIGEST, UserKey, unescape
from prefixfleet.registry.refs import VersionRef
from prefixfleet.registry.registry import Registry

PAGE_USERS = 1000  # users gc reads together
GRACE_S = 3600.0  # far beyond a publish that waits out an outage (train's --outage-deadline: 180 s)
_OBJECT_KEY = re.compile(r"(?P<ns>[^/]+)/(?P<shard>[0-9a-f]{2})/(?P<user>[^/]+)/(?P<sha>[0-9a-f]{64})\.safetensors")


@dataclass
class Fault:
    """One inconsistency. Kinds: orphan_artifact, missing_artifact, hash_mismatch,
    foreign_location, unreadable_version, duplicate_version, dangling_alias, stray_object."""

    kind: str
    location: str
    detail: str
    namespace: str | None = None
    user_id: str | None = None
    version: int | None = None
    repaired: bool = False


@dataclass
class FsckReport:
    users: int = 0
    versions: int = 0
    objects: int = 0
    repair: bool = False
    faults: list[Fault] = field(default_factory=list)
    in_flight: list[str] = field(default_factory=list)  # unreferenced artifacts younger than the grace period

    @property
    def clean(self) -> bool:
        return all(f.repaired for f in self.faults)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "clean": self.clean}


def _object_owner(object_key: str) -> tuple[UserKey, str] | None:
    """(user, sha256) of a key in the registry's layout, or None for anything else."""
    m = _OBJECT_KEY.fullmatch(object_key)
    if not m:
        return None
    try:
        key = UserKey(m["ns"], unescape(m["user"]))
    except ValueError:
        return None
    return (key, m["sha"]) if key.object_key(m["sha"]) == object_key else None


def _version_fault(reg: Registry, key: UserKey, rec: VersionRecord, sizes: dict[str, int]) -> tuple[str, str] | None:
    """(kind, detail) when the version cannot be fetched as recorded."""
    try:
        ref = VersionRef.from_record(key, rec)
    except IntegrityError as exc:
        return "unreadable_version", str(exc)
    object_key = key.object_key(ref.sha256)
    if ref.uri != reg.store.uri_for(object_key):
        return "foreign_location", f"source {ref.uri} is not the user's key {object_key}"
    if object_key not in sizes:
        return "missing_artifact", f"{object_key} does not exist"
    data = reg.store.get(object_key) or b""
    if len(data) != ref.size_bytes or hashlib.sha256(data).hexdigest() != ref.sha256:
        return "hash_mismatch", f"{object_key} does not hash to the recorded sha256"
    try:
        read_header(data).check_binding(key)
    except IntegrityError as exc:
        return "hash_mismatch", str(exc)
    return None


def _delete_version(reg: Registry, name: str, version: int) -> None:
    try:
        reg.catalog.delete_version(name, version)
    except Missing:
        pass


def _check_user(reg: Registry, report: FsckReport, key: UserKey, model: ModelRecord, records: list[VersionRecord],
                sizes: dict[str, int], referenced: set[str]) -> None:
    repair = report.repair
    name = key.model_name(reg.prefix)
    report.users += 1
    report.versions += len(records)
    live = {r.version for r in records}
    seen: dict[str, int] = {}
    for rec in reversed(records):  # oldest first
        where = dict(namespace=key.namespace, user_id=key.user_id, version=rec.version)
        sha = rec.tags.get(refs.SHA256, "")
        if SHA256_DIGEST.fullmatch(sha):
            referenced.add(key.object_key(sha))
        problem = _version_fault(reg, key, rec, sizes)
        if problem:
            kind, detail = problem
            if repair:
                _delete_version(reg, name, rec.version)
                if kind == "hash_mismatch":
                    reg.store.delete(key.object_key(sha))
                live.discard(rec.version)
            report.faults.append(Fault(kind, name, detail, **where, repaired=repair))
            continue
        ident = rec.tags.get(refs.IDENTITY, "")
        if ident in seen and rec.version not in model.aliases.values():
            if repair:
                _delete_version(reg, name, rec.version)
            report.faults.append(Fault("duplicate_version", name, f"same training result as version {seen[ident]}",
                                       **where, repaired=repair))
        seen.setdefault(ident, rec.version)
    for alias, version in model.aliases.items():
        if version not in live:
            if repair:
                try:
                    reg.catalog.delete_alias(name, alias)
                except Missing:
                    pass
            report.faults.append(Fault("dangling_alias", name, f"alias {alias!r} names missing version {version}",
                                       key.namespace, key.user_id, version, repaired=repair))
    reg.invalidate(key)


def fsck(reg: Registry, *, repair: bool = False, grace_s: float = GRACE_S) -> FsckReport:
    """Artifacts without versions, versions without (or with wrong) artifacts, duplicate versions
    of one training result, aliases to missing versions. With `repair`: orphans and duplicates are
    deleted, broken versions are deleted with their bad objects, dangling aliases are removed.
    Unreferenced artifacts younger than `grace_s` are listed in `in_flight` and left alone."""
    if grace_s < 0:
        raise ValueError(f"grace_s must be >= 0, got {grace_s}")
    report = FsckReport(repair=repair)
    sizes = {k: size for k, size in reg.store.list() if not ERASURE_KEY.fullmatch(k)}
    report.objects = len(sizes)
    referenced: set[str] = set()
    for key, model, records in reg.scan():
        _check_user(reg, report, key, model, records, sizes, referenced)
    for object_key in sorted(set(sizes) - referenced):
        owner = _object_owner(object_key)
        if owner is None:
            report.faults.append(Fault("stray_object", reg.store.uri_for(object_key),
                                       "not in the registry's key layout"))
            continue
        key, _ = owner
        written = reg.store.modified(object_key)
        if written is None:  # deleted since the listing
            continue
        if time.time() - written < grace_s:
            report.in_flight.append(reg.store.uri_for(object_key))
            continue
        if repair:
            reg.store.delete(object_key)
        report.faults.append(Fault("orphan_artifact", reg.store.uri_for(object_key), "no version refers to it",
                                   key.namespace, key.user_id, repaired=repair))
    return report


def _past(reg: Registry, keep_last: int) -> list[str]:
    """Names of the models with a live version numbered past `keep_last` (version numbers start at 1,
    so no other user has anything to drop), from one paged version search, read whole before
    anything is deleted: deleting under a search paged by offset would skip rows."""
    names: dict[str, None] = {}
    token: str | None = None
    while True:
        page, token = reg.catalog.search_versions(
            f"name LIKE '{reg.prefix}.%' AND version_number > {keep_last}", order_by="name ASC",
            max_results=VERSIONS_PER_PAGE, page_token=token)
        names.update(dict.fromkeys(r.name for r in page))
        if not token:
            return list(names)


def _targets(reg: Registry, names: list[str]) -> Iterator[tuple[UserKey, ModelRecord, list[VersionRecord]]]:
    """(user, model, live versions newest first) of each named model, read a page of users at a time."""
    iterator = iter(names)
    while page := list(islice(iterator, PAGE_USERS)):
        models, versions = models_named(reg.catalog, page), versions_named(reg.catalog, page)
        for name in page:
            user = UserKey.from_model_name(name, reg.prefix)
            if user is not None and name in models:
                yield user, models[name], versions[name]


def gc(reg: Registry, key: UserKey | None = None, *, keep_last: int = 5) -> list[VersionRef]:
    """Delete all but the newest `keep_last` versions (aliased versions always stay) and the
    artifacts no remaining version of that user uses."""
    if keep_last < 0:
        raise ValueError("keep_last must be >= 0")
    names = [key.model_name(reg.prefix)] if key is not None else _past(reg, keep_last)
    removed: list[VersionRef] = []
    for user, model, records in _targets(reg, names):
        name = user.model_name(reg.prefix)
        aliased = set(model.aliases.values())
        doomed = {r.version for r in records[keep_last:] if r.version not in aliased}
        kept_shas = {r.tags.get(refs.SHA256) for r in records if r.version not in doomed}
        try:
            for rec in records:
                if rec.version not in doomed:
                    continue
                try:
                    removed.append(VersionRef.from_record(user, rec))
                except IntegrityError:
                    continue  # unreadable metadata: left for fsck to report
                _delete_version(reg, name, rec.version)
                if rec.tags[refs.SHA256] not in kept_shas:
                    reg.store.delete(user.object_key(rec.tags[refs.SHA256]))
        finally:
            reg.invalidate(user)
    return removed
