"""What the registry hands out (VersionRef, receipts) and how a version's metadata is stored as
MLflow tags. Every tag the registry owns starts with ``prefixfleet.``."""
from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Any

from prefixfleet.registry.catalog import VersionRecord
from prefixfleet.registry.errors import IntegrityError
from prefixfleet.registry.header import ArtifactHeader, canonical_json
from prefixfleet.registry.keys import UserKey

TAG = "prefixfleet."
SHA256, SIZE = TAG + "sha256", TAG + "size_bytes"
BACKBONE, DATA, SPEC = TAG + "backbone_fingerprint", TAG + "data_fingerprint", TAG + "spec"
RUN_ID, CREATED_AT = TAG + "run_id", TAG + "created_at"
IDENTITY = TAG + "identity"  # hash of (data fingerprint, spec, backbone, settings): exactly-once key
SETTINGS = TAG + "settings"  # the training settings (absent on versions written before they were recorded)
ALIAS_REQUEST = TAG + "alias_request"  # the aliases its publish asked for, comma-separated
PROMOTED_OVER = TAG + "promoted_over"  # the production version a publish that promoted it replaced
PUBLISH_TOKEN = TAG + "publish_token"  # one per publish call: tells its own retried creates from others'
METRIC, USER_TAG = TAG + "metric.", TAG + "tag."
MODEL_NAMESPACE, MODEL_USER = TAG + "namespace", TAG + "user_id"
PRODUCTION_HISTORY = TAG + "production_history"
ROLLED_BACK = TAG + "rolled_back"  # versions a rollback took production away from
PRODUCTION = "production"
_NAME = re.compile(r"[A-Za-z0-9_.-]{1,200}")
_ALIAS = re.compile(r"[A-Za-z0-9_-]{1,200}")


def check_alias(alias: str) -> str:
    if not _ALIAS.fullmatch(alias) or alias.lower() == "latest" or re.fullmatch(r"[vV]\d+", alias):
        raise ValueError(f"alias {alias!r} must match {_ALIAS.pattern} and not be 'latest' or 'v<digits>'")
    return alias


def _check_name(kind: str, name: str) -> str:
    if not _NAME.fullmatch(name):
        raise ValueError(f"{kind} name {name!r} must match {_NAME.pattern}")
    return name


def version_tags(header: ArtifactHeader, sha256: str, size: int, *,
                 metrics: dict[str, float] | None, run_id: str | None, aliases: list[str],
                 tags: dict[str, str] | None) -> dict[str, str]:
    """The MLflow tags of a new version; raises ValueError on a bad metric or tag name."""
    out = {
        SHA256: sha256, SIZE: str(size),
        BACKBONE: header.backbone_fingerprint, DATA: header.data_fingerprint,
        SPEC: canonical_json(header.spec), CREATED_AT: header.created_at, IDENTITY: header.identity,
    }
    if header.settings:
        out[SETTINGS] = canonical_json(header.settings)
    if run_id:
        out[RUN_ID] = run_id
    if aliases:
        out[ALIAS_REQUEST] = ",".join(aliases)
    out.update({METRIC + _check_name("metric", k): repr(float(v)) for k, v in (metrics or {}).items()})
    out.update({USER_TAG + _check_name("tag", k): str(v) for k, v in (tags or {}).items()})
    return out


def model_tags(key: UserKey) -> dict[str, str]:
    return {MODEL_NAMESPACE: key.namespace, MODEL_USER: key.user_id}


def requested(rec: VersionRecord) -> set[str]:
    """The aliases a version's publish asked for."""
    return set(filter(None, rec.tags.get(ALIAS_REQUEST, "").split(",")))


def version_list(tags: dict[str, str], tag: str = PRODUCTION_HISTORY) -> list[int]:
    """A model tag holding a JSON list of version numbers ([] when absent or unreadable)."""
    try:
        return [int(v) for v in json.loads(tags.get(tag, "[]"))]
    except (TypeError, ValueError):
        return []


@dataclass(frozen=True)
class VersionRef:
    """One published prefix version of one user, with the metadata recorded at publish."""

    namespace: str
    user_id: str
    version: int
    aliases: list[str]
    sha256: str
    size_bytes: int
    uri: str
    backbone_fingerprint: str
    data_fingerprint: str
    spec: dict[str, Any]
    metrics: dict[str, float]
    run_id: str | None
    created_at: str
    tags: dict[str, str] = field(default_factory=dict)
    alias: str | None = None  # the alias this reference was resolved through, if any
    settings: dict[str, Any] = field(default_factory=dict)  # training settings; {} when not recorded

    @property
    def key(self) -> UserKey:
        return UserKey(self.namespace, self.user_id)

    def to_json(self) -> dict[str, Any]:
        """Plain JSON types; non-finite metrics become null."""
        out = asdict(self)
        out["metrics"] = {k: v if math.isfinite(v) else None for k, v in self.metrics.items()}
        return out

    @classmethod
    def from_record(cls, key: UserKey, rec: VersionRecord, alias: str | None = None,
                    aliases: list[str] | None = None) -> VersionRef:
        t = rec.tags
        try:
            key.object_key(t[SHA256])  # a digest, not a path
            return cls(
                key.namespace, key.user_id, rec.version, sorted(set(rec.aliases if aliases is None else aliases)),
                t[SHA256], int(t[SIZE]),
                rec.source, t[BACKBONE], t[DATA], json.loads(t[SPEC]),
                {k[len(METRIC):]: float(v) for k, v in t.items() if k.startswith(METRIC)},
                t.get(RUN_ID), t.get(CREATED_AT, ""),
                {k[len(USER_TAG):]: v for k, v in t.items() if k.startswith(USER_TAG)}, alias,
                json.loads(t[SETTINGS]) if SETTINGS in t else {},
            )
        except (KeyError, ValueError) as exc:
            raise IntegrityError(f"version {rec.version} of {key} has unreadable metadata: {exc!r}") from exc


@dataclass(frozen=True)
class ForgetReceipt:
    """Everything `forget` removed for one user."""

    namespace: str
    user_id: str
    model_name: str | None  # None when MLflow held nothing for the user
    versions: list[int]
    aliases: dict[str, int]
    objects: list[str]  # URIs of the artifacts deleted

    def to_json(self) -> dict[str, Any]:
        return asdict(self)
