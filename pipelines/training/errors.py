"""Errors that stop a training job; the CLI prints them as a one-line reason."""
from __future__ import annotations


class JobError(RuntimeError):
    """The job cannot start or cannot finish (bad input, backbone that will not load, …)."""
