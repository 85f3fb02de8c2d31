"""The safetensors header of a prefix artifact: 8-byte little-endian length, then JSON whose
``__metadata__`` binds the tensors to one user. Read without torch."""
from __future__ import annotations

import hashlib
import json
import struct
from dataclasses import dataclass

from prefixfleet.registry.errors import IntegrityError
from prefixfleet.registry.keys import UserKey

FORMAT = "prefixfleet/1"
MAX_HEADER_BYTES = 1 << 24
_FIELDS = ("namespace", "user_id", "spec", "backbone_fingerprint", "data_fingerprint", "created_at")


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
    if len(data) < 8:
        raise IntegrityError("artifact is truncated (no header length)")
    (length,) = struct.unpack("<Q", data[:8])
    if length > min(len(data) - 8, MAX_HEADER_BYTES):
        raise IntegrityError("artifact header is truncated or oversized")
    try:
        header = json.loads(data[8:8 + length])
        meta = header.pop("__metadata__")
        ends = [int(t["data_offsets"][1]) for t in header.values()]
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        raise IntegrityError(f"artifact header is malformed: {exc!r}") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise IntegrityError(f"not a {FORMAT} artifact")
    missing = [f for f in _FIELDS if not isinstance(meta.get(f), str)]
    if missing:
        raise IntegrityError(f"artifact metadata lacks {', '.join(missing)}")
    expected = 8 + length + max(ends, default=0)
    if len(data) != expected:
        raise IntegrityError(f"artifact is {len(data)} bytes, its header describes {expected}")
    settings = meta.get("settings", "")
    if not isinstance(settings, str):
        raise IntegrityError("artifact metadata has non-text settings")
    return ArtifactHeader(*(meta[f] for f in _FIELDS), expected_size=expected, settings=settings)
