"""Errors the workers raise; each names the user (and example) it concerns."""
from __future__ import annotations


class WorkerError(Exception):
    """Base class for every error raised by workers/."""


class UnsupportedArchitecture(WorkerError):
    """The backbone's model_type has no entry in the architecture table."""


class BadExample(WorkerError):
    """An example cannot be trained on (empty, tokenizes to nothing, wrong fields)."""


class BackboneMismatch(WorkerError):
    """A prefix was made for another backbone than the one it is being loaded into."""


class BadArtifact(WorkerError):
    """Artifact bytes are not a prefixfleet prefix, or do not match their own metadata."""
