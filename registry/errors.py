"""Errors the registry raises; all derive from RegistryError (InvalidUserKey is also a ValueError)."""
from __future__ import annotations


class RegistryError(Exception):
    """Base of every registry error."""


class NotFound(RegistryError):
    """Unknown user, alias or version; the message names the user and the namespace."""


class IntegrityError(RegistryError):
    """Bytes or metadata do not match what the registry recorded for that user: nothing is returned."""


class InvalidUserKey(RegistryError, ValueError):
    """A namespace or user id that cannot be stored safely; the message names the problem."""


class Unavailable(RegistryError):
    """A server stayed unreachable past the outage deadline; nothing of the operation is lost, and
    running it again once the server is back finishes it."""


class Forbidden(RegistryError):
    """The object store refused these credentials for this key (each namespace may hold its own):
    nothing was read or written there."""
