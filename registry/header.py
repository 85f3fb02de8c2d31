"""What the registry reads from an artifact's header (workers.artifact_format, no torch): the user
it is bound to, its fingerprints and settings, and the exactly-once identity they make."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from prefixfleet.registry.errors import IntegrityError
from prefixfleet.registry.keys import UserKey
from prefixfleet.workers import artifact_format


def canonical_json(text: str) -> str:
    """JSON (a spec, settings) with sorted keys and no spaces, so equal values compare equal as text."""
    try:
        return json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"not JSON: {exc}") from exc


def identity(data_fingerprint: str, spec: str, backbone_fingerprint: str, settings: str = "") -> str:
    """Hash of what makes two publishes the same training result (invariant 5, exactly once):
    data, spec, backbone and training settings. Without settings (artifacts written before they
    were recorded) the hash is the earlier one of data, spec and backbone alone, so those versions
    keep their identity; a new artifact never shares it."""
    parts = [data_fingerprint, canonical_json(spec), backbone_fingerprint]
    if settings:
        parts.append(canonical_json(settings))
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


@dataclass(frozen=True)
class ArtifactHeader:
    """The metadata of one artifact, plus the byte length its tensors claim."""

    namespace: str
    user_id: str
    spec: str
    backbone_fingerprint: str
    data_fingerprint: str
    created_at: str
    expected_size: int
    settings: str = ""

    @property
    def key(self) -> UserKey:
        return UserKey(self.namespace, self.user_id)

    @property
    def identity(self) -> str:
        return identity(self.data_fingerprint, self.spec, self.backbone_fingerprint, self.settings)

    def check_binding(self, key: UserKey) -> None:
        """Raise IntegrityError unless the artifact belongs to `key`."""
        if (self.namespace, self.user_id) != (key.namespace, key.user_id):
            raise IntegrityError(
                f"artifact belongs to user {self.user_id!r} in namespace {self.namespace!r}, not to {key}"
            )


def read_header(data: bytes) -> ArtifactHeader:
    """Parse and check the header; raise IntegrityError if it is not a complete prefixfleet artifact."""
    try:
        header = artifact_format.read_header(data)
    except artifact_format.FormatError as exc:
        raise IntegrityError(str(exc)) from exc
    meta = header.metadata
    return ArtifactHeader(*(meta[f] for f in artifact_format.REQUIRED), expected_size=header.size,
                          settings=meta["settings"])
