"""The slice of the MLflow model registry the prefix registry uses, behind one interface with two
backends: the REST API of an `mlflow server` (rest) and a SQL database in-process (sql). Records
are plain data; MLflow entities never leave the backends. `open_catalog` picks the backend; a
backend is imported only when chosen (sql imports MLflow's SQL store, seconds of start-up)."""
from __future__ import annotations

from prefixfleet.registry.catalog.base import (
    PAGE_MAX_MODELS,
    AlreadyExists,
    Catalog,
    Missing,
    ModelRecord,
    Transient,
    VersionRecord,
    is_write_race,
    mlflow_error,
)
from prefixfleet.registry.catalog.retry import RetryingCatalog
from prefixfleet.registry.errors import RegistryError
from prefixfleet.registry.retry import RetryPolicy

__all__ = [
    "PAGE_MAX_MODELS", "AlreadyExists", "Catalog", "Missing", "ModelRecord", "Transient", "VersionRecord",
    "RetryingCatalog", "is_write_race", "mlflow_error", "open_catalog",
]


def open_catalog(tracking_uri: str, *, pool_size: int = 32, policy: RetryPolicy | None = None) -> RetryingCatalog:
    """REST for http(s)://, an in-process SQL store for database URIs (sqlite, postgresql, mysql,
    mssql); either with every operation retried under `policy` (default: `RetryPolicy.from_env()`)."""
    return RetryingCatalog(_backend(tracking_uri, pool_size), policy)


def _backend(tracking_uri: str, pool_size: int) -> Catalog:
    scheme = tracking_uri.split(":", 1)[0].lower()
    if scheme in ("http", "https"):
        from prefixfleet.registry.catalog.rest import RestCatalog

        return RestCatalog(tracking_uri, pool_size=pool_size)
    if scheme.split("+", 1)[0] in ("sqlite", "postgresql", "mysql", "mssql"):
        from prefixfleet.registry.catalog.sql import SqlCatalog

        return SqlCatalog(tracking_uri)
    raise RegistryError(f"unsupported MLflow tracking URI {tracking_uri!r}: use http(s)://… or a database URI")
