"""Has this user already been trained from this data, spec, settings and backbone? The
exactly-once look-up a plan makes, with the rule for versions published before the training
settings joined the identity.

Rule: such a version (its artifact records no settings) counts as trained with the settings its
job recorded as MLflow run parameters (`config.*`); it matches when those equal this job's, the
learning rate resolved for the method on both sides. A version with no readable job run (imported,
or its run deleted) matches no job, so it is trained again once, under the full identity.
"""
from __future__ import annotations

import ast
import threading
from dataclasses import fields

from cachetools import LRUCache
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from prefixfleet.registry import Registry, UserKey, VersionRef
from prefixfleet.registry.errors import RegistryError
from prefixfleet.workers.errors import WorkerError
from prefixfleet.workers.spec import PrefixSpec, TrainConfig

CONFIG_PARAM = "config."
_RUNS_CACHED = 1024


def config_params(config: TrainConfig) -> dict[str, str]:
    """The run parameters a job records for its training settings."""
    return {f"{CONFIG_PARAM}{f.name}": str(getattr(config, f.name)) for f in fields(TrainConfig)}


def config_from_params(params: dict[str, str]) -> TrainConfig | None:
    """The settings a job recorded, or None when they cannot be read back exactly."""
    values = {k[len(CONFIG_PARAM):]: v for k, v in params.items() if k.startswith(CONFIG_PARAM)}
    known = {f.name for f in fields(TrainConfig)}
    if not values or set(values) - known:
        return None
    try:
        return TrainConfig(**{k: ast.literal_eval(v) for k, v in values.items()})
    except (ValueError, SyntaxError, TypeError, WorkerError):
        return None


class PublishedLookup:
    """`find` for one job's planning; thread-safe, one MLflow run read per earlier job."""

    def __init__(self, registry: Registry, backbone_fingerprint: str) -> None:
        self.registry, self.backbone_fingerprint = registry, backbone_fingerprint
        self._client = MlflowClient(tracking_uri=registry.tracking_uri)
        self._runs: LRUCache[str, TrainConfig | None] = LRUCache(_RUNS_CACHED)
        self._lock = threading.Lock()

    def find(self, key: UserKey, data_fingerprint: str, spec: PrefixSpec, config: TrainConfig) -> VersionRef | None:
        settings = config.settings_json(spec.method)
        common = dict(data_fingerprint=data_fingerprint, spec=spec.to_json(),
                      backbone_fingerprint=self.backbone_fingerprint)
        found = self.registry.find(key, settings=settings, **common)
        if found is not None:
            return found
        earlier = self.registry.find(key, settings="", **common)
        if earlier is not None and earlier.run_id:
            recorded = self._recorded(earlier.run_id)
            if recorded is not None and recorded.settings_json(spec.method) == settings:
                return earlier
        return None

    def _recorded(self, run_id: str) -> TrainConfig | None:
        with self._lock:
            if run_id in self._runs:
                return self._runs[run_id]
        try:
            recorded = config_from_params(self._client.get_run(run_id).data.params)
        except MlflowException as exc:
            if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise RegistryError(f"reading the settings of job run {run_id}: {exc.message}") from exc
            recorded = None
        with self._lock:
            self._runs[run_id] = recorded
        return recorded
