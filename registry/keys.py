"""UserKey: a (namespace, user) pair validated once, and its reversible, collision-free mappings
to MLflow registered-model names and object-store key prefixes.

Escaping: characters outside ``[a-z0-9_-]`` (upper case included) become ``~`` plus two lowercase
hex digits per UTF-8 byte. The result is injective (``~`` itself is escaped), contains no ``/``,
``:`` or ``.``, and stays unique on case-insensitive databases. Model names are
``{prefix}.{namespace}.{escaped user}``; namespaces and prefixes contain no ``.``, so a name parses
back to exactly one key.
"""
from __future__ import annotations

import hashlib
import re
import unicodedata
from dataclasses import dataclass

from prefixfleet.registry.errors import IntegrityError, InvalidUserKey

MAX_ESCAPED_USER = 200  # keeps model names within MLflow's 256 and file names within 255 bytes
_NAMESPACE = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")
_PREFIX = re.compile(r"[a-z][a-z0-9-]{0,15}")
_RAW = frozenset("abcdefghijklmnopqrstuvwxyz0123456789_-")
_ESCAPED = re.compile(r"(?:[a-z0-9_-]|~[0-9a-f]{2})+")
_CONFUSABLE_SCRIPTS = frozenset({"LATIN", "CYRILLIC", "GREEK"})
SHA256_DIGEST = re.compile(r"[0-9a-f]{64}")


def escape(text: str) -> str:
    """Reversible escape of `text` into ``[a-z0-9_~-]``."""
    return "".join(ch if ch in _RAW else "".join(f"~{b:02x}" for b in ch.encode()) for ch in text)


def unescape(text: str) -> str:
    """Inverse of `escape`; raises ValueError on text `escape` cannot produce."""
    if not _ESCAPED.fullmatch(text):
        raise ValueError(f"not an escaped user id: {text!r}")
    out, i = bytearray(), 0
    while i < len(text):
        if text[i] == "~":
            out.append(int(text[i + 1:i + 3], 16))
            i += 3
        else:
            out += text[i].encode()
            i += 1
    decoded = out.decode()
    if escape(decoded) != text:  # e.g. an escaped byte that did not need escaping
        raise ValueError(f"not a canonical escaped user id: {text!r}")
    return decoded


def check_prefix(prefix: str) -> str:
    """Validate the registered-model name prefix that separates this registry from other MLflow users."""
    if not _PREFIX.fullmatch(prefix):
        raise ValueError(f"model name prefix {prefix!r} must match {_PREFIX.pattern}")
    return prefix


def check_namespace(namespace: str) -> str:
    if not isinstance(namespace, str) or not _NAMESPACE.fullmatch(namespace):
        raise InvalidUserKey(f"namespace {namespace!r} must match {_NAMESPACE.pattern}")
    return namespace


def _user_problem(user_id: object) -> str | None:
    if not isinstance(user_id, str):
        return f"must be a string, not {type(user_id).__name__}"
    if not user_id:
        return "is empty"
    if user_id != user_id.strip():
        return "has leading or trailing whitespace"
    for ch in user_id:
        category = unicodedata.category(ch)
        if category[0] == "C" or category in ("Zl", "Zp"):
            return f"contains the control or unassigned character U+{ord(ch):04X}"
    if unicodedata.normalize("NFKC", user_id) != user_id:
        return "is not in Unicode NFKC form (look-alike or compatibility characters)"
    scripts = {unicodedata.name(ch, "").split(" ")[0] for ch in user_id if ch.isalpha()}
    if len(scripts & _CONFUSABLE_SCRIPTS) > 1:
        return "mixes Latin, Cyrillic or Greek letters (look-alike characters)"
    if len(escape(user_id)) > MAX_ESCAPED_USER:
        return f"is too long (escaped form over {MAX_ESCAPED_USER} characters)"
    return None


@dataclass(frozen=True)
class UserKey:
    """One user (or task) inside one namespace (tenant). Raises InvalidUserKey when unsafe."""

    namespace: str
    user_id: str

    def __post_init__(self) -> None:
        check_namespace(self.namespace)
        if problem := _user_problem(self.user_id):
            raise InvalidUserKey(f"user id {self.user_id!r} {problem}")

    def __str__(self) -> str:
        return f"user {self.user_id!r} in namespace {self.namespace!r}"

    @property
    def escaped_user(self) -> str:
        return escape(self.user_id)

    @property
    def shard(self) -> str:
        """Two hex digits spreading users over 256 key prefixes (S3 rates are per prefix)."""
        return hashlib.sha256(f"{self.namespace}/{self.escaped_user}".encode()).hexdigest()[:2]

    @property
    def object_dir(self) -> str:
        """Key prefix, relative to the store root, under which all of this user's artifacts live."""
        return f"{self.namespace}/{self.shard}/{self.escaped_user}"

    def object_key(self, sha256: str) -> str:
        """Where the artifact with this digest lives; IntegrityError if it is not a sha256 digest."""
        if not SHA256_DIGEST.fullmatch(sha256):
            raise IntegrityError(f"{sha256[:80]!r} is not a sha256 digest")
        return f"{self.object_dir}/{sha256}.safetensors"

    def model_name(self, prefix: str) -> str:
        return f"{prefix}.{self.namespace}.{self.escaped_user}"

    @classmethod
    def from_model_name(cls, name: str, prefix: str) -> UserKey | None:
        """The key a registered-model name stands for, or None if the name is not one of ours."""
        head, sep, rest = name.partition(".")
        namespace, sep2, escaped = rest.partition(".")
        if head != prefix or not sep or not sep2:
            return None
        try:
            return cls(namespace, unescape(escaped))
        except ValueError:  # includes InvalidUserKey and undecodable bytes
            return None
