"""The prefix artifact format, without torch: safetensors bytes (8-byte little-endian header length,
a JSON header, the tensor data) whose header's `__metadata__` binds the tensors to one user.

The one definition: workers write it (workers.artifact), the registry reads the header to check
the binding without torch (registry.header), tests build artifacts with it.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

FORMAT = "prefixfleet/1"
REQUIRED = ("namespace", "user_id", "spec", "backbone_fingerprint", "data_fingerprint", "created_at")
OPTIONAL = ("backbone", "settings")  # absent in artifacts written before they were recorded
MAX_HEADER_BYTES = 1 << 24


class FormatError(ValueError):
    """The bytes are not a complete prefixfleet artifact."""


def metadata(*, namespace: str, user_id: str, spec: str, backbone_fingerprint: str, data_fingerprint: str,
             created_at: str = "", backbone: str = "", settings: str = "") -> dict[str, str]:
    """The `__metadata__` of a new artifact (all strings); `created_at` defaults to now (UTC)."""
    return {
        "format": FORMAT, "namespace": namespace, "user_id": user_id, "spec": spec,
        "backbone_fingerprint": backbone_fingerprint, "data_fingerprint": data_fingerprint,
        "created_at": created_at or datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "backbone": backbone, "settings": settings,
    }


@dataclass(frozen=True)
class Header:
    """An artifact's parsed header: its metadata (optional fields filled with "") and the number of
    bytes the whole artifact must have."""

    metadata: dict[str, str]
    size: int


def read_header(data: bytes) -> Header:
    """Parse and check the header; FormatError unless the bytes are a complete prefixfleet artifact."""
    if len(data) < 8:
        raise FormatError("artifact is truncated (no header length)")
    (length,) = struct.unpack("<Q", data[:8])
    if length > min(len(data) - 8, MAX_HEADER_BYTES):
        raise FormatError("artifact header is truncated or oversized")
    try:
        header: dict[str, Any] = json.loads(data[8:8 + length])
        meta = header.pop("__metadata__", None)
        ends = [int(t["data_offsets"][1]) for t in header.values()]
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as exc:
        raise FormatError(f"artifact header is malformed: {exc!r}") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise FormatError(f"not a {FORMAT} artifact")
    missing = [f for f in REQUIRED if not isinstance(meta.get(f), str)]
    if missing:
        raise FormatError(f"artifact metadata lacks {', '.join(missing)}")
    if any(not isinstance(meta.get(f, ""), str) for f in OPTIONAL):
        raise FormatError("artifact metadata has a non-text field")
    size = 8 + length + max(ends, default=0)
    if len(data) != size:
        raise FormatError(f"artifact is {len(data)} bytes, its header describes {size}")
    return Header({**{f: "" for f in OPTIONAL}, **meta}, size)
