"""The per-user prefix registry: MLflow holds one registered model per (namespace, user) whose
versions carry the artifact's sha256, size, fingerprints, spec, run id and metrics as tags; the
object store holds the bytes, content-addressed under the user's own key prefix."""
from __future__ import annotations

import hashlib
import os
import threading
import uuid
from collections.abc import Hashable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from prefixfleet.registry import refs
from prefixfleet.registry.cache import ContentCache, ResolutionCache
from prefixfleet.registry.catalog import Missing, ModelRecord, VersionRecord, open_catalog
from prefixfleet.registry.catalog.base import models_named
from prefixfleet.registry.erasure import ERASURE_DIR, ErasureSnapshot, Forgotten, Tombstones
from prefixfleet.registry.errors import IntegrityError, NotFound, RegistryError
from prefixfleet.registry.header import identity, read_header
from prefixfleet.registry.home import home_dir
from prefixfleet.registry.index import INDEX, LISTED, Published, index_after, index_of, read_index, trusted
from prefixfleet.registry.keys import UserKey, check_namespace, check_prefix
from prefixfleet.registry.refs import ForgetReceipt, VersionRef
from prefixfleet.registry.store import FileStore, open_store

_SETTLE_ROUNDS = 20
_HISTORY = 100  # production versions remembered for rollback


@dataclass(frozen=True)
class RegistryAddress:
    """Where a registry is, as plain data that travels to Ray actors and Serve replicas (a Registry
    holds connections and does not). Credentials come from the environment where it is opened."""

    tracking_uri: str
    store_uri: str
    s3_endpoint_url: str | None = None
    model_prefix: str = "pf"

    def open(self) -> Registry:
        return Registry(self.tracking_uri, self.store_uri, s3_endpoint_url=self.s3_endpoint_url,
                        model_prefix=self.model_prefix)


def _forgotten(key: UserKey) -> Forgotten:
    return Forgotten(f"{key} was forgotten after this publish began; nothing of it was kept")


class Registry:
    """Publish, resolve and fetch per-user prefixes. Thread-safe; share one per process.

    `resolve_ttl` bounds how stale a cached resolution may be (see registry.cache);
    `cache_bytes` bounds the verified-content cache; `model_prefix` starts every registered-model
    name, so several registries (or test runs) can share one MLflow server without meeting.
    """

    def __init__(self, tracking_uri: str, store_uri: str, *, s3_endpoint_url: str | None = None,
                 model_prefix: str = "pf", resolve_ttl: float = 1.0, cache_bytes: int = 256 << 20,
                 max_workers: int = 16) -> None:
        self.tracking_uri, self.store_uri, self.s3_endpoint_url = tracking_uri, store_uri, s3_endpoint_url
        self.prefix = check_prefix(model_prefix)
        self.max_workers = max_workers
        self.catalog = open_catalog(tracking_uri, pool_size=2 * max_workers)
        self.store = open_store(store_uri, endpoint_url=s3_endpoint_url, max_pool_connections=2 * max_workers)
        self.tombstones = Tombstones(self.store)
        self._resolutions: ResolutionCache[VersionRef] = ResolutionCache(ttl=resolve_ttl)
        self._contents = ContentCache(max_bytes=cache_bytes)
        self._refreshing: set[tuple[str, Hashable]] = set()
        self._refresh_lock = threading.Lock()
        self._refresher = ThreadPoolExecutor(2, thread_name_prefix="registry-refresh")

    @classmethod
    def from_env(cls, home: Path | None = None) -> Registry:
        """MLFLOW_TRACKING_URI, PREFIXFLEET_STORE and AWS_ENDPOINT_URL select real servers; otherwise
        sqlite and a file store under `home` (else $PREFIXFLEET_HOME, else ~/.prefixfleet).
        PREFIXFLEET_MODEL_PREFIX (default "pf") starts every registered-model name."""
        home = home_dir(home)
        tracking = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{home}/mlflow.db"
        store = os.environ.get("PREFIXFLEET_STORE") or (home / "store").as_uri()
        return cls(tracking, store, s3_endpoint_url=os.environ.get("AWS_ENDPOINT_URL") or None,
                   model_prefix=os.environ.get("PREFIXFLEET_MODEL_PREFIX") or "pf")

    @property
    def address(self) -> RegistryAddress:
        return RegistryAddress(self.tracking_uri, self.store_uri, self.s3_endpoint_url, self.prefix)

    def check_reachable(self, namespace: str) -> None:
        """One cheap read from MLflow and one from the object store (inside `namespace`, which
        per-namespace credentials allow); Unavailable when either does not answer within the retry
        deadline (see `retry.waiting_at_most`)."""
        self.catalog.get_model(f"{self.prefix}-reachability-check")
        next(self.store.list(f"{check_namespace(namespace)}/{ERASURE_DIR}/reachability-check"), None)

    def close(self) -> None:
        self._refresher.shutdown(wait=True)
        self.catalog.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- publishing -------------------------------------------------------------------------

    def publish(self, key: UserKey, artifact: bytes, *, metrics: dict[str, float] | None = None,
                run_id: str | None = None, alias: str | None = "candidate", promote: bool = False,
                tags: dict[str, str] | None = None, erasures: ErasureSnapshot | None = None,
                published: Published | None = None) -> VersionRef:
        """Store `artifact` as a new version of `key` and point `alias` at it; `promote`: production
        too, recorded for rollback (it goes back to the production this one replaced).

        Exactly once: when a version of this user already has the artifact's (data fingerprint,
        spec, backbone fingerprint), that version is returned and nothing is created; concurrent
        retries that race past the check keep the oldest version and delete their own.
        Concurrent publishes leave each alias on the newest version that asked for it.
        Erasure: a user forgotten after `erasures` was taken (a job's start; without one, this
        call's start) raises Forgotten, and whatever this call wrote is removed again.
        `published`: what a bulk read (`published()`) said of this user, as a job's plan has it.
        For a returning user it stands in for the exactly-once check, and the publish is one
        create, its alias writes and one read back, unless another publish overtook the read; a
        new user's publish is the same after creating its model.
        """
        header = read_header(artifact)
        header.check_binding(key)
        aliases = list(dict.fromkeys([*([alias] if alias else []), *([refs.PRODUCTION] if promote else [])]))
        for name in aliases:
            refs.check_alias(name)
        if self.tracking_uri.startswith(("http://", "https://")) and isinstance(self.store, FileStore):
            raise RegistryError("an MLflow server does not register file:// artifacts; "
                                "set PREFIXFLEET_STORE to s3://bucket/prefix")
        known = self.tombstones.known(key, erasures)
        sha256 = hashlib.sha256(artifact).hexdigest()
        tags_ = refs.version_tags(header, sha256, len(artifact), metrics=metrics, run_id=run_id,
                                  aliases=aliases, tags=tags)
        token = tags_[refs.PUBLISH_TOKEN] = uuid.uuid4().hex
        name = key.model_name(self.prefix)
        try:
            ref = self._publish(key, name, artifact, tags_, aliases, known, published)
        except (Missing, Forgotten):  # the model went away under us: only a forget deletes one
            self._undo_if_forgotten(key, name, sha256, token, known)
            raise
        self._undo_if_forgotten(key, name, sha256, token, known)
        return ref

    def _publish(self, key: UserKey, name: str, artifact: bytes, tags: dict[str, str], aliases: list[str],
                 known: frozenset[str], published: Published | None) -> VersionRef:
        ident = tags[refs.IDENTITY]
        expected: int | None = None  # the version number `mine` gets when nothing overtook what is known
        if published is not None and published.latest > 0 and published.oldest(ident) is None:
            if not published.complete and (twin := self._oldest_twin(name, ident)):  # beyond what it lists
                return self._exact_ref(key, name, twin.version)
            tags[INDEX], expected = index_after(published), published.latest + 1
            if refs.PRODUCTION in aliases and published.production is not None:
                tags[refs.PROMOTED_OVER] = str(published.production)
        elif self.catalog.create_model(name, refs.model_tags(key)):  # a new user: no version can be older
            tags[INDEX], expected = index_after(Published(key)), 1
        elif twin := self._oldest_twin(name, ident):
            return self._exact_ref(key, name, twin.version)
        object_key = key.object_key(tags[refs.SHA256])
        self.store.put(object_key, artifact)
        mine = self._create_version(key, name, self.store.uri_for(object_key), tags, artifact, known)
        try:
            if mine.version == expected and self._aliased_at_once(name, mine, aliases):
                kept, aliased = mine, aliases
            else:
                kept, aliased = self._settle(name, mine, aliases)
        finally:
            self._resolutions.invalidate(name)
        if kept.version != mine.version:
            if kept.tags[refs.SHA256] != tags[refs.SHA256]:
                self.store.delete(object_key)
            return self._exact_ref(key, name, kept.version)
        return VersionRef.from_record(key, kept, aliases=aliased)

    def _aliased_at_once(self, name: str, mine: VersionRecord, aliases: list[str]) -> bool:
        """Point `aliases` at `mine`, created right after what the plan read (or as the first version
        of a model this publish created), then read the model
        once: when nothing newer exists and every alias names `mine`, the publish is settled (no
        twin can be older, and a later writer reads after its own write)."""
        if not aliases:
            return True
        for alias in aliases:
            self.catalog.set_alias(name, alias, mine.version)
        model = self.catalog.get_model(name)
        return model is not None and model.latest == mine.version and all(
            model.aliases.get(a) == mine.version for a in aliases)

    def _create_version(self, key: UserKey, name: str, uri: str, tags: dict[str, str], artifact: bytes,
                        known: frozenset[str]) -> VersionRecord:
        try:
            return self.catalog.create_version(name, uri, tags, tags.get(refs.RUN_ID, ""))
        except Missing:  # deleted since our create: by a forget, or by a publish undoing itself after one
            self._refuse_forgotten(key, known)
            self.catalog.create_model(name, refs.model_tags(key))
            self.store.put(key.object_key(tags[refs.SHA256]), artifact)  # a racing undo may have taken it
            return self.catalog.create_version(name, uri, tags, tags.get(refs.RUN_ID, ""))

    def _refuse_forgotten(self, key: UserKey, known: frozenset[str]) -> None:
        if self.tombstones.forgotten_since(key, known):
            raise _forgotten(key)

    def _undo_if_forgotten(self, key: UserKey, name: str, sha256: str, token: str, known: frozenset[str]) -> None:
        """After a publish's last write: if a forget came meanwhile, remove what this publish wrote
        (its versions, then its artifact and the model unless later work uses them) and raise
        Forgotten. Work begun after that forget keeps its own versions."""
        if not self.tombstones.forgotten_since(key, known):
            return
        try:
            for rec in list(self.versions(name)):
                if rec.tags.get(refs.PUBLISH_TOKEN) == token:
                    self._delete_version(name, rec.version)
            rest = list(self.versions(name))
            if not any(r.tags.get(refs.SHA256) == sha256 for r in rest):
                self.store.delete(key.object_key(sha256))
            if not rest:
                try:
                    self.catalog.delete_model(name)
                except Missing:
                    pass
        finally:
            self.invalidate(key)
        raise _forgotten(key)

    def _delete_version(self, name: str, version: int) -> None:
        try:
            self.catalog.delete_version(name, version)
        except Missing:
            pass

    def find(self, key: UserKey, *, data_fingerprint: str, spec: str, backbone_fingerprint: str,
             settings: str = "") -> VersionRef | None:
        """The version already published from this data, spec, backbone and training settings, if
        any. `settings=""` finds a version whose artifact recorded no settings (written before
        they joined the identity, or imported)."""
        name = key.model_name(self.prefix)
        twin = self._oldest_twin(name, identity(data_fingerprint, spec, backbone_fingerprint, settings))
        return self._exact_ref(key, name, twin.version) if twin else None

    def published(self, keys: list[UserKey]) -> dict[UserKey, Published | None]:
        """What is published for many users, from one search of registered models per batch of
        names: None for a user whose index is missing or stale (ask `find` and `resolve` for that one)."""
        names = {key.model_name(self.prefix): key for key in keys}
        models = models_named(self.catalog, list(names))
        return {key: read_index(key, models.get(name)) for name, key in names.items()}

    def _exact_ref(self, key: UserKey, name: str, version: int) -> VersionRef:
        """A fresh read of one version, aliases included (searches do not report aliases)."""
        rec = self.catalog.get_version(name, version)
        if rec is None:
            raise self._not_found(key, name, version)
        return VersionRef.from_record(key, rec)

    def _oldest_twin(self, name: str, ident: str) -> VersionRecord | None:
        found, _ = self.catalog.search_versions(
            f"name = '{name}' AND tags.`{refs.IDENTITY}` = '{ident}'", order_by="version_number ASC", max_results=1)
        return found[0] if found else None

    def _settle(self, name: str, mine: VersionRecord, aliases: list[str]) -> tuple[VersionRecord, list[str]]:
        """After creating `mine`: find its oldest twin (same identity) and leave each alias on the
        newest surviving version that asked for it. Whoever writes an alias reads the versions
        again and corrects it until the read agrees with its last write, so the last writer always
        leaves the newest requester and no concurrent update is lost. Deletes `mine` if it is a
        younger twin, and any version an earlier attempt of this publish created (a create whose
        response was lost: same publish token), then writes the newest version's index from a
        read that saw all below it, unless it is trusted already (a racing publish may have
        deleted the newest this one saw: whoever deletes last reads again). Returns (kept
        version, the aliases left on it)."""
        ident, token = mine.tags[refs.IDENTITY], mine.tags[refs.PUBLISH_TOKEN]
        if refs.PRODUCTION in aliases:
            self._note_replaced(name, mine)
        written: dict[str, int] = {}
        for alias in aliases:
            self.catalog.set_alias(name, alias, mine.version)
            written[alias] = mine.version
        kept: VersionRecord | None = None
        leftovers: set[int] = set()
        recent: list[VersionRecord] = []
        more: str | None = None
        for _ in range(_SETTLE_ROUNDS):
            recent, more = self.catalog.search_versions(
                f"name = '{name}'", order_by="version_number DESC", max_results=LISTED)
            oldest: dict[str, int] = {}
            for v in reversed(recent):
                oldest.setdefault(v.tags.get(refs.IDENTITY, ""), v.version)
            if kept is None:
                kept = next((v for v in recent if v.version == oldest.get(ident)), mine)
                if more and (older := self._oldest_twin(name, ident)) and older.version < kept.version:
                    kept = older  # the page was full: a twin may lie beyond it
                leftovers = {v.version for v in recent if v.tags.get(refs.PUBLISH_TOKEN) == token
                             and v.version not in (kept.version, mine.version)}
            lost = kept.version != mine.version
            stale = {}
            for alias in aliases:
                wanted = max((v.version for v in recent if alias in refs.requested(v)
                              and oldest[v.tags.get(refs.IDENTITY, "")] == v.version
                              and not (lost and v.version == mine.version)), default=None)
                if wanted is not None and wanted != written[alias]:
                    stale[alias] = wanted
            if not stale:
                break
            for alias, wanted in stale.items():
                self.catalog.set_alias(name, alias, wanted)
                written[alias] = wanted
        kept = kept or mine
        deleted = leftovers | ({mine.version} - {kept.version})
        for version in sorted(deleted):
            self._delete_version(name, version)
        if deleted:  # read again: racing publishes may have deleted theirs too
            recent, more = self.catalog.search_versions(
                f"name = '{name}'", order_by="version_number DESC", max_results=LISTED)
        if recent and not trusted(recent[0]):
            try:
                self.catalog.set_version_tag(name, recent[0].version, INDEX,
                                             index_of(recent, recent[0].version, complete=not more))
            except Missing:
                pass  # a racing publish deleted it as a twin: it reads again after deleting
        return kept, [a for a in aliases if written[a] == kept.version]

    def _note_replaced(self, name: str, mine: VersionRecord) -> None:
        """Record on `mine` the production it is about to replace, as read now (what a plan
        knew may have been overtaken), for the production history."""
        model = self.catalog.get_model(name)
        current = model.aliases.get(refs.PRODUCTION) if model else None
        if current is not None and current != mine.version and mine.tags.get(refs.PROMOTED_OVER) != str(current):
            self.catalog.set_version_tag(name, mine.version, refs.PROMOTED_OVER, str(current))

    # ---- reading ----------------------------------------------------------------------------

    def resolve(self, key: UserKey, alias: str = refs.PRODUCTION, *, version: int | None = None,
                fresh: bool = False) -> VersionRef:
        """The version `alias` points to (or version `version`), served from a short-lived cache;
        `fresh`: read MLflow now (and refresh the cache), as a decision about production must."""
        name = key.model_name(self.prefix)
        selector: Hashable = version if version is not None else alias
        if fresh:
            return self._resolve_now(key, name, selector)
        ref, needs_refresh = self._resolutions.get(name, selector)
        if ref is None:
            return self._resolve_now(key, name, selector)
        if needs_refresh:
            self._refresh_later(key, name, selector)
        return ref

    def fetch(self, key: UserKey, alias: str = refs.PRODUCTION, *, version: int | None = None) -> bytes:
        """The verified artifact bytes of `resolve(key, alias / version)`."""
        return self.fetch_ref(self.resolve(key, alias, version=version))

    def fetch_ref(self, ref: VersionRef) -> bytes:
        """The bytes of `ref`, only if their sha256, size, namespace, user and fingerprints all match
        the record; otherwise IntegrityError. Reads only the user's own content-addressed key."""
        cached = self._contents.get(ref.namespace, ref.user_id, ref.sha256)
        if cached is not None:
            return cached
        key = ref.key
        object_key = key.object_key(ref.sha256)
        if ref.uri != self.store.uri_for(object_key):
            raise IntegrityError(f"version {ref.version} of {key} points outside the user's storage: {ref.uri}")
        data = self.store.get(object_key)
        if data is None:
            raise IntegrityError(f"artifact of version {ref.version} of {key} is missing from {ref.uri}")
        if len(data) != ref.size_bytes or hashlib.sha256(data).hexdigest() != ref.sha256:
            raise IntegrityError(f"artifact of version {ref.version} of {key} does not match its sha256")
        header = read_header(data)
        header.check_binding(key)
        if (header.backbone_fingerprint, header.data_fingerprint) != (ref.backbone_fingerprint, ref.data_fingerprint):
            raise IntegrityError(f"artifact of version {ref.version} of {key} has other fingerprints than recorded")
        self._contents.put(ref.namespace, ref.user_id, ref.sha256, data)
        return data

    def history(self, key: UserKey) -> list[VersionRef]:
        """Every version of the user, newest first; NotFound for an unknown user."""
        name = key.model_name(self.prefix)
        model = self.catalog.get_model(name)
        if model is None:
            raise self._unknown_user(key)
        return [VersionRef.from_record(key, r, aliases=model.aliases_of(r.version)) for r in self.versions(name)]

    def rolled_back(self, key: UserKey) -> list[int]:
        """The versions a rollback took production away from, oldest first ([] for an unknown user)."""
        model = self.catalog.get_model(key.model_name(self.prefix))
        return refs.version_list(model.tags, refs.ROLLED_BACK) if model else []

    def list_users(self, namespace: str) -> Iterator[UserKey]:
        """Users of one namespace in name order, streamed page by page."""
        for key, _ in self.models(check_namespace(namespace)):
            yield key

    def models(self, namespace: str | None = None) -> Iterator[tuple[UserKey, ModelRecord]]:
        """(key, MLflow record) of every user of this registry, or of one namespace, streamed."""
        token: str | None = None
        while True:
            page, token = self.catalog.search_models(f"name LIKE '{self._name_pattern(namespace)}'", token)
            for m in page:
                if key := self._user_of(m.name, namespace):
                    yield key, m
            if not token:
                return

    def _name_pattern(self, namespace: str | None) -> str:
        return f"{self.prefix}.{namespace}.%" if namespace else f"{self.prefix}.%"

    def _user_of(self, name: str, namespace: str | None) -> UserKey | None:
        """The user a model name found by `_name_pattern` belongs to, if it is ours ('_' is a LIKE wildcard)."""
        key = UserKey.from_model_name(name, self.prefix)
        return key if key is not None and namespace in (None, key.namespace) else None

    def versions(self, name: str) -> Iterator[VersionRecord]:
        """Every live version record of a registered model, newest first."""
        token: str | None = None
        while True:
            page, token = self.catalog.search_versions(
                f"name = '{name}'", order_by="version_number DESC", max_results=1000, page_token=token)
            yield from page
            if not token:
                return

    def scan(self, namespace: str | None = None) -> Iterator[tuple[UserKey, ModelRecord, list[VersionRecord]]]:
        """(key, MLflow record, live versions newest first) of every user of this registry, or of one
        namespace, streamed a page at a time from the catalog's bulk read."""
        cursor: str | None = None
        while True:
            page, cursor = self.catalog.scan(self._name_pattern(namespace), cursor)
            for model, versions in page:
                if key := self._user_of(model.name, namespace):
                    yield key, model, versions
            if not cursor:
                return

    def _resolve_now(self, key: UserKey, name: str, selector: Hashable) -> VersionRef:
        generation = self._resolutions.generation(name)
        if isinstance(selector, int):
            rec = self.catalog.get_version(name, selector)
        else:
            rec = self.catalog.get_version_by_alias(name, str(selector))
        if rec is None:
            raise self._not_found(key, name, selector)
        ref = VersionRef.from_record(key, rec, alias=None if isinstance(selector, int) else str(selector))
        self._resolutions.put(name, selector, ref, generation)
        return ref

    def _refresh_later(self, key: UserKey, name: str, selector: Hashable) -> None:
        with self._refresh_lock:
            if (name, selector) in self._refreshing:
                return
            self._refreshing.add((name, selector))

        def refresh() -> None:
            try:
                self._resolve_now(key, name, selector)
            except RegistryError:
                self._resolutions.invalidate(name)
            finally:
                with self._refresh_lock:
                    self._refreshing.discard((name, selector))

        self._refresher.submit(refresh)

    def _unknown_user(self, key: UserKey) -> NotFound:
        return NotFound(f"no prefix for user {key.user_id!r} in namespace {key.namespace!r}")

    def _not_found(self, key: UserKey, name: str, selector: Hashable) -> NotFound:
        if self.catalog.get_model(name) is None:
            return self._unknown_user(key)
        what = f"version {selector}" if isinstance(selector, int) else f"alias {selector!r}"
        return NotFound(f"no {what} for user {key.user_id!r} in namespace {key.namespace!r}")

    # ---- managing ---------------------------------------------------------------------------

    def erasure_snapshot(self, namespaces: Iterable[str]) -> ErasureSnapshot:
        """The forgets known now in these namespaces: a job takes one when it starts, and its
        publishes keep nothing of a user forgotten after that (see `publish`)."""
        return self.tombstones.snapshot(check_namespace(ns) for ns in namespaces)

    def forgotten_since(self, key: UserKey, erasures: ErasureSnapshot) -> bool:
        """Whether the user was forgotten after `erasures` was taken."""
        return self.tombstones.forgotten_since(key, self.tombstones.known(key, erasures))

    def pseudonym(self, key: UserKey) -> str:
        """How records that outlive a forget (job runs) name the user: stable, and no id in it."""
        return self.tombstones.pseudonym(key)

    def invalidate(self, key: UserKey) -> None:
        """Drop this process's cached resolutions and bytes of one user."""
        self._resolutions.invalidate(key.model_name(self.prefix))
        self._contents.drop_user(key.namespace, key.user_id)

    def promote(self, key: UserKey, version: int, alias: str = refs.PRODUCTION) -> VersionRef:
        """Point `alias` at `version`; production moves are recorded for rollback."""
        name = key.model_name(self.prefix)
        refs.check_alias(alias)
        rec = self.catalog.get_version(name, version)
        if rec is None:
            raise self._not_found(key, name, version)
        model = self.catalog.get_model(name) if alias == refs.PRODUCTION else None
        try:
            self.catalog.set_alias(name, alias, version)
            if model is not None:
                self._record_production(name, self._production_history(name, model))
        finally:
            self._resolutions.invalidate(name)
        return VersionRef.from_record(key, rec, alias=alias, aliases=[*rec.aliases, alias])

    def production_history(self, key: UserKey) -> list[int]:
        """The versions production has named, oldest first, ending at production ([] for none)."""
        model = self.catalog.get_model(key.model_name(self.prefix))
        return self._production_history(key.model_name(self.prefix), model) if model else []

    def rollback(self, key: UserKey) -> VersionRef:
        """Move production back to the production version before the current one."""
        name = key.model_name(self.prefix)
        model = self.catalog.get_model(name)
        if model is None:
            raise self._unknown_user(key)
        current = model.aliases.get(refs.PRODUCTION)
        if current is None:
            raise self._not_found(key, name, refs.PRODUCTION)
        history = self._production_history(name, model)
        while history and history[-1] == current:
            history.pop()
        while history and self.catalog.get_version(name, history[-1]) is None:
            history.pop()
        if not history:
            raise NotFound(f"no earlier production version for user {key.user_id!r} in namespace {key.namespace!r}")
        rolled_back = (refs.version_list(model.tags, refs.ROLLED_BACK) + [current])[-100:]
        try:
            self.catalog.set_alias(name, refs.PRODUCTION, history[-1])
            self.catalog.set_model_tag(name, refs.PRODUCTION_HISTORY, repr(history))
            self.catalog.set_model_tag(name, refs.ROLLED_BACK, repr(rolled_back))
        finally:
            self._resolutions.invalidate(name)
        return self.resolve(key, refs.PRODUCTION)

    def _production_history(self, name: str, model: ModelRecord) -> list[int]:
        """The history recorded on the model (by promotes and rollbacks), then the versions that
        publishes promoted since, each found from the next by the production it replaced."""
        recorded = refs.version_list(model.tags)
        since: list[int] = []
        current = model.aliases.get(refs.PRODUCTION)
        while current is not None and len(since) < _HISTORY:
            if current in recorded:
                return (recorded[:len(recorded) - recorded[::-1].index(current)] + since[::-1])[-_HISTORY:]
            since.append(current)
            rec = self.catalog.get_version(name, current)
            replaced = rec.tags.get(refs.PROMOTED_OVER, "") if rec else ""
            current = int(replaced) if replaced.isdigit() else None
        return (recorded + since[::-1])[-_HISTORY:]

    def _record_production(self, name: str, before: list[int]) -> None:
        """Record the production history as `before` (the history up to the production a promote
        replaced) ending with the version production names now. Written from a read and read
        again until a read agrees, so concurrent promotes leave the history ending where
        production is: the last writer reads its own write."""
        for _ in range(_SETTLE_ROUNDS):
            model = self.catalog.get_model(name)
            current = model.aliases.get(refs.PRODUCTION) if model else None
            if model is None or current is None or refs.version_list(model.tags)[-1:] == [current]:
                return
            history = before if before[-1:] == [current] else before + [current]
            self.catalog.set_model_tag(name, refs.PRODUCTION_HISTORY, repr(history[-_HISTORY:]))

    def forget(self, key: UserKey) -> ForgetReceipt:
        """Erase every version, alias, tag and artifact of the user (idempotent). A tombstone goes
        first, so publishes begun earlier (and jobs started earlier) keep nothing of the user."""
        name = key.model_name(self.prefix)
        self.tombstones.record(key)
        model = self.catalog.get_model(name)
        versions = [r.version for r in self.versions(name)] if model else []
        try:
            if model:
                try:
                    self.catalog.delete_model(name)
                except Missing:
                    pass
            objects = self.store.delete_prefix(key.object_dir)
        finally:
            self.invalidate(key)
        return ForgetReceipt(key.namespace, key.user_id, name if model else None, versions,
                             dict(model.aliases) if model else {}, [self.store.uri_for(k) for k in objects])
