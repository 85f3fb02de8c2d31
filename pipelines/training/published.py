"""Has this user already been trained from this data, spec, settings and backbone? The
exactly-once look-up a plan makes, from the chunk's bulk read of the published index where it is
complete and fresh, else from MLflow for this user; with the rule for versions published before
the training settings joined the identity.

Rule: such a version (its artifact records no settings) counts as trained with the settings its
job recorded as MLflow run parameters (`config.*`); it matches when those equal this job's, the
learning rate resolved for the method on both sides. A version with no readable job run (imported,
or its run deleted) matches no job, so it is trained again once, under the full identity.
"""
from __future__ import annotations

import ast
import threading
from dataclasses import dataclass, fields

from cachetools import LRUCache
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from prefixfleet.registry import Registry, UserKey
from prefixfleet.registry.errors import RegistryError
from prefixfleet.registry.header import identity
from prefixfleet.registry.index import Published
from prefixfleet.registry.refs import PRODUCTION
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
        return TrainConfig(**{k: _literal(v) for k, v in values.items()})
    except (TypeError, WorkerError):
        return None


def _literal(text: str) -> object:
    """A parameter as MLflow stores it (`str(value)`) back to the value: numbers, None, strings."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


@dataclass(frozen=True)
class Found:
    """A version already trained from a task."""

    version: int
    run_id: str
    in_production: bool


class PublishedLookup:
    """`find` for one job's planning; thread-safe, one MLflow run read per earlier job."""

    def __init__(self, registry: Registry, backbone_fingerprint: str) -> None:
        self.registry, self.backbone_fingerprint = registry, backbone_fingerprint
        self._client = MlflowClient(tracking_uri=registry.tracking_uri)
        self._runs: LRUCache[str, TrainConfig | None] = LRUCache(_RUNS_CACHED)
        self._lock = threading.Lock()

    def find(self, key: UserKey, data_fingerprint: str, spec: PrefixSpec, config: TrainConfig,
             published: Published | None = None) -> Found | None:
        """From `published` (the user's bulk read) when it lists every version, else from MLflow."""
        settings = config.settings_json(spec.method)
        if published is not None and published.complete:
            wanted = (data_fingerprint, spec.to_json(), self.backbone_fingerprint)
            hit = published.oldest(identity(*wanted, settings))
            if hit is None and (earlier := published.oldest(identity(*wanted))) is not None:
                hit = earlier if self._same_settings(earlier.run_id, spec, settings) else None
            return None if hit is None else Found(hit.version, hit.run_id, published.production == hit.version)
        common = dict(data_fingerprint=data_fingerprint, spec=spec.to_json(),
                      backbone_fingerprint=self.backbone_fingerprint)
        found = self.registry.find(key, settings=settings, **common)
        if found is None and (earlier := self.registry.find(key, settings="", **common)) is not None:
            found = earlier if self._same_settings(earlier.run_id, spec, settings) else None
        return None if found is None else Found(found.version, found.run_id or "", PRODUCTION in found.aliases)

    def _same_settings(self, run_id: str | None, spec: PrefixSpec, settings: str) -> bool:
        """Whether the job run of a version without recorded settings trained with these."""
        recorded = self._recorded(run_id) if run_id else None
        return recorded is not None and recorded.settings_json(spec.method) == settings

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
