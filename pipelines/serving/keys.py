"""API keys that scope a caller to one namespace.

A keys file holds one key per line as `namespace sha256-hex-of-the-key` (blank lines and `#`
comments allowed): the server never stores a key itself, only its hash. `new_key` makes a key and
its line. A caller holding a key for namespace A is told about B's users exactly what it is told
about users that do not exist; without keys configured every caller is trusted (and the server
binds only to loopback unless told otherwise).
"""
from __future__ import annotations

import hashlib
import ipaddress
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from fastapi import Header, Request

from prefixfleet.registry import InvalidUserKey, NotFound, UserKey
from prefixfleet.registry.keys import check_namespace

KEY_PREFIX = "pf-"
DEFAULT_NAMESPACE = "default"


class KeysFileError(ValueError):
    """The keys file cannot be used (the message names the line)."""


class Unauthorized(Exception):
    """No key, or a key the server does not know."""


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key(namespace: str) -> tuple[str, str]:
    """A fresh key for `namespace` and the line that grants it (append it to the keys file)."""
    key = KEY_PREFIX + secrets.token_urlsafe(32)
    return key, f"{check_namespace(namespace)} {digest(key)}"


@dataclass(frozen=True)
class Caller:
    """Who is asking: `namespace` None is a trusted caller of a server without keys."""

    namespace: str | None

    @property
    def default_namespace(self) -> str:
        """Where a bare user id lives: the key's namespace, else "default"."""
        return self.namespace or DEFAULT_NAMESPACE

    def check(self, key: UserKey) -> UserKey:
        """`key` if this caller may use it; else the very NotFound an unknown user gets."""
        if self.namespace is not None and key.namespace != self.namespace:
            raise NotFound(f"no prefix for user {key.user_id!r} in namespace {key.namespace!r}")
        return key

    def user(self, namespace: str | None, user_id: str) -> UserKey:
        try:
            key = UserKey(namespace or self.default_namespace, user_id)
        except InvalidUserKey:
            if self.namespace is not None and namespace not in (None, self.namespace):
                raise NotFound(f"no prefix for user {user_id!r} in namespace {namespace!r}") from None
            raise
        return self.check(key)


TRUSTED = Caller(None)


class ApiKeys:
    """Hashed keys → namespace."""

    def __init__(self, namespaces_by_digest: dict[str, str]) -> None:
        self._by_digest = dict(namespaces_by_digest)

    @classmethod
    def load(cls, path: Path) -> ApiKeys:
        try:
            lines = path.read_text().splitlines()
        except OSError as exc:
            raise KeysFileError(f"cannot read the keys file {path}: {exc.strerror or exc}") from exc
        found: dict[str, str] = {}
        for number, line in enumerate(lines, start=1):
            text = line.split("#", 1)[0].strip()
            if not text:
                continue
            parts = text.split()
            where = f"{path}:{number}"
            if len(parts) != 2 or len(parts[1]) != 64 or any(c not in "0123456789abcdef" for c in parts[1]):
                raise KeysFileError(f"{where}: expected 'namespace sha256-hex' (make one with `prefixfleet api-key`)")
            try:
                check_namespace(parts[0])
            except InvalidUserKey as exc:
                raise KeysFileError(f"{where}: {exc}") from None
            if parts[1] in found and found[parts[1]] != parts[0]:
                raise KeysFileError(f"{where}: this key is already granted to namespace {found[parts[1]]!r}")
            found[parts[1]] = parts[0]
        if not found:
            raise KeysFileError(f"the keys file {path} grants no key")
        return cls(found)

    def caller(self, authorization: str | None) -> Caller:
        """The caller an `Authorization: Bearer …` header names; Unauthorized otherwise."""
        scheme, _, key = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not key.strip():
            raise Unauthorized("an API key is required: Authorization: Bearer <key>")
        namespace = self._by_digest.get(digest(key.strip()))
        if namespace is None:
            raise Unauthorized("the API key is not valid")
        return Caller(namespace)


def current_caller(request: Request, authorization: Annotated[str | None, Header()] = None) -> Caller:
    """FastAPI dependency: the caller of this request under the app's keys (`app.state.keys`)."""
    keys: ApiKeys | None = request.app.state.keys
    return TRUSTED if keys is None else keys.caller(authorization)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
