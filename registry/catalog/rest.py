"""Catalog over the REST API of an `mlflow server`, through one pooled keep-alive session.

MlflowClient adds a get-registered-model request before each registry write (its prompt check)
and retries 5xx with multi-second backoff; here each operation is exactly one request, sockets
set TCP_NODELAY and keep-alive, and transient failures surface as `Transient` for the caller's
jittered retry. Auth follows MLflow's variables: MLFLOW_TRACKING_TOKEN, MLFLOW_TRACKING_USERNAME
and MLFLOW_TRACKING_PASSWORD, MLFLOW_TRACKING_INSECURE_TLS, MLFLOW_TRACKING_SERVER_CERT_PATH.
"""
from __future__ import annotations

import os
import socket
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from urllib3.util import Retry

from prefixfleet.registry.catalog.base import (
    PAGE_MAX_MODELS,
    AlreadyExists,
    Catalog,
    Missing,
    ModelRecord,
    Transient,
    VersionRecord,
    mlflow_error,
)

_SOCKET_OPTIONS = [(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1), (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)]
_TRANSIENT_STATUS = frozenset({429, 500, 502, 503, 504})


class _TunedAdapter(HTTPAdapter):
    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["socket_options"] = _SOCKET_OPTIONS
        super().init_poolmanager(*args, **kwargs)


def _tags(items: list[dict[str, str]] | None) -> dict[str, str]:
    return {t["key"]: t.get("value", "") for t in items or []}


def _version(js: dict[str, Any]) -> VersionRecord:
    return VersionRecord(js["name"], int(js["version"]), js.get("source", ""), _tags(js.get("tags")),
                         tuple(js.get("aliases", ())), int(js.get("creation_timestamp", 0)))


def _model(js: dict[str, Any]) -> ModelRecord:
    aliases = {a["alias"]: int(a["version"]) for a in js.get("aliases", [])}
    newest = max(js.get("latest_versions", []), key=lambda v: int(v["version"]), default=None)
    return ModelRecord(js["name"], _tags(js.get("tags")), aliases, int(newest["version"]) if newest else 0,
                       _tags(newest.get("tags")) if newest else {})


class RestCatalog(Catalog):
    def __init__(self, uri: str, *, pool_size: int = 32, timeout: float = 30.0) -> None:
        self.base = uri.rstrip("/") + "/api/2.0/mlflow/"
        self.timeout = timeout
        self.session = requests.Session()
        adapter = _TunedAdapter(pool_connections=2, pool_maxsize=pool_size,
                                max_retries=Retry(total=3, connect=3, read=0, status=0, backoff_factor=0.05))
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)
        if token := os.environ.get("MLFLOW_TRACKING_TOKEN"):
            self.session.headers["Authorization"] = f"Bearer {token}"
        elif user := os.environ.get("MLFLOW_TRACKING_USERNAME"):
            self.session.auth = (user, os.environ.get("MLFLOW_TRACKING_PASSWORD", ""))
        if os.environ.get("MLFLOW_TRACKING_INSECURE_TLS", "").lower() == "true":
            self.session.verify = False
        elif cert := os.environ.get("MLFLOW_TRACKING_SERVER_CERT_PATH"):
            self.session.verify = cert

    def _call(self, method: str, endpoint: str, body: dict[str, Any]) -> dict[str, Any]:
        kwargs: dict[str, Any] = {"params": body} if method == "GET" else {"json": body}
        try:
            resp = self.session.request(method, self.base + endpoint, timeout=self.timeout, **kwargs)
        except (requests.ConnectionError, requests.Timeout) as exc:  # a read timeout too: the answer was lost
            raise Transient(f"MLflow {endpoint}: {exc}") from exc
        if resp.status_code == 200:
            return resp.json() if resp.content else {}
        try:
            error = resp.json()
        except ValueError:
            error = {}
        raise mlflow_error(error.get("error_code", ""), error.get("message", resp.text[:200]),
                           unavailable=resp.status_code in _TRANSIENT_STATUS,
                           where=f"MLflow {endpoint} answered {resp.status_code}")

    def create_model(self, name: str, tags: dict[str, str]) -> bool:
        body = {"name": name, "tags": [{"key": k, "value": v} for k, v in tags.items()]}
        try:
            self._call("POST", "registered-models/create", body)
            return True
        except AlreadyExists:
            return False

    def get_model(self, name: str) -> ModelRecord | None:
        try:
            return _model(self._call("GET", "registered-models/get", {"name": name})["registered_model"])
        except Missing:
            return None

    def delete_model(self, name: str) -> None:
        self._call("DELETE", "registered-models/delete", {"name": name})

    def search_models(self, filter_string: str, page_token: str | None) -> tuple[list[ModelRecord], str | None]:
        body = {"filter": filter_string, "max_results": PAGE_MAX_MODELS, "order_by": ["name ASC"]}
        if page_token:
            body["page_token"] = page_token
        js = self._call("GET", "registered-models/search", body)
        return [_model(m) for m in js.get("registered_models", [])], js.get("next_page_token") or None

    def set_model_tag(self, name: str, key: str, value: str) -> None:
        self._call("POST", "registered-models/set-tag", {"name": name, "key": key, "value": value})

    def create_version(self, name: str, source: str, tags: dict[str, str], run_id: str = "") -> VersionRecord:
        body = {"name": name, "source": source, "tags": [{"key": k, "value": v} for k, v in tags.items()]}
        if run_id:
            body["run_id"] = run_id
        return _version(self._call("POST", "model-versions/create", body)["model_version"])

    def set_version_tag(self, name: str, version: int, key: str, value: str) -> None:
        self._call("POST", "model-versions/set-tag", {"name": name, "version": str(version), "key": key, "value": value})

    def get_version(self, name: str, version: int) -> VersionRecord | None:
        try:
            js = self._call("GET", "model-versions/get", {"name": name, "version": str(version)})
        except Missing:
            return None
        return _version(js["model_version"])

    def get_version_by_alias(self, name: str, alias: str) -> VersionRecord | None:
        try:
            js = self._call("GET", "registered-models/alias", {"name": name, "alias": alias})
        except Missing:
            return None
        return _version(js["model_version"])

    def search_versions(self, filter_string: str, *, order_by: str, max_results: int,
                        page_token: str | None = None) -> tuple[list[VersionRecord], str | None]:
        body: dict[str, Any] = {"filter": filter_string, "max_results": max_results, "order_by": [order_by]}
        if page_token:
            body["page_token"] = page_token
        js = self._call("GET", "model-versions/search", body)
        return [_version(v) for v in js.get("model_versions", [])], js.get("next_page_token") or None

    def delete_version(self, name: str, version: int) -> None:
        self._call("DELETE", "model-versions/delete", {"name": name, "version": str(version)})

    def set_alias(self, name: str, alias: str, version: int) -> None:
        self._call("POST", "registered-models/alias", {"name": name, "alias": alias, "version": str(version)})

    def delete_alias(self, name: str, alias: str) -> None:
        self._call("DELETE", "registered-models/alias", {"name": name, "alias": alias})

    def close(self) -> None:
        self.session.close()
