"""A prefix as safetensors bytes plus typed metadata; loading checks the backbone binding."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from prefixfleet.workers import artifact_format
from prefixfleet.workers.errors import BackboneMismatch, BadArtifact, WorkerError
from prefixfleet.workers.prefix import PrefixTensors
from prefixfleet.workers.spec import PrefixSpec

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class ArtifactMeta:
    """What a prefix is bound to. Stored as the safetensors header's `__metadata__` (all strings)."""

    namespace: str
    user_id: str
    spec: PrefixSpec
    backbone_fingerprint: str
    data_fingerprint: str
    created_at: str = ""
    backbone: str = ""  # the id or path it was trained from: where `generate` finds it by default
    settings: str = ""  # TrainConfig.settings_json; "" in artifacts written before settings were recorded

    def to_header(self) -> dict[str, str]:
        return artifact_format.metadata(
            namespace=self.namespace, user_id=self.user_id, spec=self.spec.to_json(),
            backbone_fingerprint=self.backbone_fingerprint, data_fingerprint=self.data_fingerprint,
            created_at=self.created_at, backbone=self.backbone, settings=self.settings)

    @classmethod
    def from_header(cls, header: dict[str, str]) -> ArtifactMeta:
        """From a header `artifact_format.read_header` checked: every field present."""
        try:
            spec = PrefixSpec.from_json(header["spec"])
        except (WorkerError, ValueError, TypeError) as exc:
            raise BadArtifact(f"artifact spec is unreadable: {exc}") from exc
        return cls(header["namespace"], header["user_id"], spec, header["backbone_fingerprint"],
                   header["data_fingerprint"], header["created_at"], header["backbone"], header["settings"])


def serialize(tensors: PrefixTensors, meta: ArtifactMeta) -> bytes:
    """safetensors bytes in the spec's storage dtype; overhead is the header alone."""
    dtype = _DTYPES[meta.spec.dtype]
    return st_save({k: v.detach().to("cpu", dtype).contiguous() for k, v in tensors.items()}, metadata=meta.to_header())


def read_meta(data: bytes) -> ArtifactMeta:
    """The metadata alone, from the checked header; no tensor is read."""
    try:
        header = artifact_format.read_header(data)
    except artifact_format.FormatError as exc:
        raise BadArtifact(str(exc)) from exc
    return ArtifactMeta.from_header(header.metadata)


def deserialize(data: bytes, *, backbone_fingerprint: str | None = None) -> tuple[PrefixTensors, ArtifactMeta]:
    """Tensors (float32) and metadata. With `backbone_fingerprint`, a prefix made for another
    backbone is refused."""
    meta = read_meta(data)
    if backbone_fingerprint is not None and meta.backbone_fingerprint != backbone_fingerprint:
        raise BackboneMismatch(
            f"prefix of user {meta.user_id!r} (namespace {meta.namespace!r}) was trained on backbone "
            f"{meta.backbone_fingerprint[:12]}…, not on the loaded backbone {backbone_fingerprint[:12]}…"
        )
    try:
        tensors = st_load(data)
    except SafetensorError as exc:
        raise BadArtifact(f"artifact tensors are unreadable: {exc}") from exc
    return {k: v.float() for k, v in tensors.items()}, meta
