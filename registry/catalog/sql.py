"""Catalog on MLflow's own SQL registry store, in-process (the embedded default is sqlite).

sqlite runs in WAL mode (readers never wait for the writer) with synchronous=NORMAL (no fsync
per commit); MLflow sets a 20 s busy timeout per session. Version-number races that outlast
MLflow's three retries, locked-database errors, and unique-key collisions of racing alias or tag
upserts surface as `Transient`.
"""
from __future__ import annotations

import sqlite3
from collections import defaultdict
from pathlib import Path

from mlflow.entities.model_registry import ModelVersion, ModelVersionTag, RegisteredModel, RegisteredModelTag
from mlflow.entities.model_registry.model_version_stages import STAGE_DELETED_INTERNAL
from mlflow.exceptions import MlflowException
from mlflow.store.model_registry.dbmodels.models import (
    SqlModelVersion,
    SqlModelVersionTag,
    SqlRegisteredModel,
    SqlRegisteredModelAlias,
    SqlRegisteredModelTag,
)
from mlflow.store.model_registry.sqlalchemy_store import SqlAlchemyStore
from sqlalchemy import event, select

from prefixfleet.registry.catalog.base import (
    PAGE_MAX_MODELS,
    AlreadyExists,
    Catalog,
    Missing,
    ModelRecord,
    VersionRecord,
    mlflow_error,
)

_SQLITE = "sqlite:///"
SCAN_PAGE = 5000  # models per page of `SqlCatalog.scan`


def _enable_wal(db_uri: str) -> None:
    if not db_uri.startswith(_SQLITE) or db_uri == _SQLITE + ":memory:":
        return
    path = Path(db_uri[len(_SQLITE):].split("?", 1)[0])
    path.parent.mkdir(parents=True, exist_ok=True)
    with sqlite3.connect(path) as conn:
        conn.execute("PRAGMA journal_mode=WAL")


def _sync_normal(dbapi_connection: sqlite3.Connection, _record: object) -> None:
    """WAL's recommended durability: commits skip fsync (the WAL is synced at checkpoints), the
    database cannot corrupt; a power cut may undo the last commits."""
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


def _version(mv: ModelVersion) -> VersionRecord:
    return VersionRecord(mv.name, int(mv.version), mv.source or "", dict(mv.tags), tuple(mv.aliases),
                         int(mv.creation_timestamp or 0))


def _model(rm: RegisteredModel) -> ModelRecord:
    newest = max(rm.latest_versions or (), key=lambda v: int(v.version), default=None)
    return ModelRecord(rm.name, dict(rm._tags), {a: int(v) for a, v in rm.aliases.items()},
                       int(newest.version) if newest else 0, dict(newest.tags) if newest else {})


class SqlCatalog(Catalog):
    def __init__(self, db_uri: str) -> None:
        _enable_wal(db_uri)
        self.store = SqlAlchemyStore(db_uri)
        engine = self.store.engine  # MLflow shares one engine per URI
        if db_uri.startswith(_SQLITE) and not event.contains(engine, "connect", _sync_normal):
            event.listen(engine, "connect", _sync_normal)
            engine.dispose()  # pooled connections reconnect with the setting

    def _do(self, method: str, *args: object, **kwargs: object):  # type: ignore[no-untyped-def]
        try:
            return getattr(self.store, method)(*args, **kwargs)
        except MlflowException as exc:
            raise mlflow_error(exc.error_code, exc.message) from exc

    def create_model(self, name: str, tags: dict[str, str]) -> bool:
        try:
            self._do("create_registered_model", name, [RegisteredModelTag(k, v) for k, v in tags.items()])
            return True
        except AlreadyExists:
            return False

    def get_model(self, name: str) -> ModelRecord | None:
        try:
            return _model(self._do("get_registered_model", name))
        except Missing:
            return None

    def delete_model(self, name: str) -> None:
        self._do("delete_registered_model", name)

    def search_models(self, filter_string: str, page_token: str | None) -> tuple[list[ModelRecord], str | None]:
        page = self._do("search_registered_models", filter_string, PAGE_MAX_MODELS,
                        ["name ASC"], page_token)
        return [_model(m) for m in page], page.token or None

    def set_model_tag(self, name: str, key: str, value: str) -> None:
        self._do("set_registered_model_tag", name, RegisteredModelTag(key, value))

    def create_version(self, name: str, source: str, tags: dict[str, str], run_id: str = "") -> VersionRecord:
        mv = self._do("create_model_version", name, source, run_id=run_id or None,
                      tags=[ModelVersionTag(k, v) for k, v in tags.items()])
        return _version(mv)

    def set_version_tag(self, name: str, version: int, key: str, value: str) -> None:
        self._do("set_model_version_tag", name, str(version), ModelVersionTag(key, value))

    def get_version(self, name: str, version: int) -> VersionRecord | None:
        try:
            return _version(self._do("get_model_version", name, str(version)))
        except Missing:
            return None

    def get_version_by_alias(self, name: str, alias: str) -> VersionRecord | None:
        try:
            return _version(self._do("get_model_version_by_alias", name, alias))
        except Missing:
            return None

    def search_versions(self, filter_string: str, *, order_by: str, max_results: int,
                        page_token: str | None = None) -> tuple[list[VersionRecord], str | None]:
        page = self._do("search_model_versions", filter_string, max_results, [order_by], page_token)
        return [_version(v) for v in page], page.token or None

    def delete_version(self, name: str, version: int) -> None:
        self._do("delete_model_version", name, str(version))

    def set_alias(self, name: str, alias: str, version: int) -> None:
        self._do("set_registered_model_alias", name, alias, str(version))

    def delete_alias(self, name: str, alias: str) -> None:
        self._do("delete_registered_model_alias", name, alias)

    def scan(self, pattern: str, cursor: str | None) -> tuple[list[tuple[ModelRecord, list[VersionRecord]]], str | None]:
        """The bulk read of fsck straight from MLflow's tables, through MLflow's own table models,
        read-only, in one transaction: a page of names after `cursor` (keyset, so a page deep in the
        registry costs what the first does), then the tags, aliases, live versions and version tags
        of that name range, five indexed range reads, no ORM objects (about 50 µs a model)."""
        store = self.store
        M, V = SqlRegisteredModel, SqlModelVersion

        def where(table: type) -> list:
            return [*store._get_workspace_clauses(table), table.name >= names[0], table.name <= names[-1]]

        with store.engine.connect() as conn:
            page = select(M.name).where(*store._get_workspace_clauses(M), M.name.like(pattern))
            if cursor is not None:
                page = page.where(M.name > cursor)
            names = conn.execute(page.order_by(M.name).limit(SCAN_PAGE)).scalars().all()
            if not names:
                return [], None
            T, A, VT = SqlRegisteredModelTag, SqlRegisteredModelAlias, SqlModelVersionTag
            tags: dict[str, dict[str, str]] = defaultdict(dict)
            for name, key, value in conn.execute(select(T.name, T.key, T.value).where(*where(T))):
                tags[name][key] = value or ""
            aliases: dict[str, dict[str, int]] = defaultdict(dict)
            for name, alias, version in conn.execute(select(A.name, A.alias, A.version).where(*where(A))):
                aliases[name][alias] = int(version)
            version_tags: dict[tuple[str, int], dict[str, str]] = defaultdict(dict)
            for name, version, key, value in conn.execute(select(VT.name, VT.version, VT.key, VT.value).where(*where(VT))):
                version_tags[name, version][key] = value or ""
            versions: dict[str, list[VersionRecord]] = defaultdict(list)
            live = select(V.name, V.version, V.source, V.creation_time).where(
                *where(V), V.current_stage != STAGE_DELETED_INTERNAL).order_by(V.name, V.version.desc())
            for name, version, source, created in conn.execute(live):
                versions[name].append(VersionRecord(name, int(version), source or "", version_tags[name, version], (),
                                                    int(created or 0)))
        out = []
        for name in names:
            mine = versions[name]
            newest = mine[0] if mine else None
            out.append((ModelRecord(name, tags[name], aliases[name], newest.version if newest else 0,
                                    dict(newest.tags) if newest else {}), mine))
        return out, names[-1] if len(names) == SCAN_PAGE else None

    def close(self) -> None:
        self.store.engine.dispose()
