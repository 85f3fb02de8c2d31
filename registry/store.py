"""Immutable object stores behind one interface: a local directory (file://) or S3-compatible
storage (s3://bucket/prefix via boto3). Keys are relative to the store root."""
from __future__ import annotations

import os
import shutil
import threading
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar
from urllib.parse import unquote, urlparse

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError, HTTPClientError, NoCredentialsError
from botocore.exceptions import ConnectionError as BotoConnectionError

from prefixfleet.registry.errors import Forbidden, RegistryError
from prefixfleet.registry.retry import RetryPolicy

# botocore's standard mode retries 5xx, throttling and connection errors a few times; past those,
# the registry's retry rule goes on until the outage deadline. A conditional put whose response
# was lost finds its own object on the retry (PreconditionFailed), which `put` reads as "exists":
# the content is addressed by its hash, so it is ours.
S3_ATTEMPTS = 4
_TRANSIENT_CODES = frozenset({"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout", "ServiceUnavailable",
                              "InternalError", "RequestTimeTooSkewed"})
_REFUSED_CODES = frozenset({"AccessDenied", "AllAccessDisabled", "InvalidAccessKeyId", "SignatureDoesNotMatch"})
T = TypeVar("T")
_SESSION = boto3.session.Session()
_SESSION_LOCK = threading.Lock()


class ObjectStore(ABC):
    """Create-once objects addressed by relative keys such as ``ns/ab/user/<sha256>.safetensors``."""

    uri: str

    def uri_for(self, key: str) -> str:
        return f"{self.uri}/{key}"

    @abstractmethod
    def put(self, key: str, data: bytes) -> bool:
        """Write unless the key exists; True when this call created it."""

    @abstractmethod
    def get(self, key: str) -> bytes | None:
        """The object's bytes, or None when it does not exist."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove one object; absent objects are ignored."""

    @abstractmethod
    def delete_prefix(self, prefix: str) -> list[str]:
        """Remove every object under ``prefix/`` (and, on disk, the folder); return the keys removed."""

    @abstractmethod
    def list(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        """(key, size) of every object in folder ``prefix`` (the whole store when empty), streamed."""

    @abstractmethod
    def modified(self, key: str) -> float | None:
        """When the object was written (seconds since the epoch), or None when it does not exist."""


class FileStore(ObjectStore):
    """Objects as files under a root folder; create-once through a hard link (atomic, no overwrite)."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()
        self.uri = self.root.as_uri()

    def _path(self, key: str) -> Path:
        return self.root / key

    def put(self, key: str, data: bytes) -> bool:
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.{uuid.uuid4().hex}.tmp"
        tmp.write_bytes(data)
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink()

    def get(self, key: str) -> bytes | None:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            return None

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)
        for parent in list(self._path(key).parents)[:2]:  # the user folder, then the shard folder
            try:
                parent.rmdir()
            except OSError:
                break

    def delete_prefix(self, prefix: str) -> list[str]:
        keys = [key for key, _ in self.list(prefix)]
        shutil.rmtree(self._path(prefix), ignore_errors=True)
        try:
            self._path(prefix).parent.rmdir()
        except OSError:
            pass
        return keys

    def modified(self, key: str) -> float | None:
        try:
            return self._path(key).stat().st_mtime
        except FileNotFoundError:
            return None

    def list(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        base = self._path(prefix) if prefix else self.root
        for folder, _, files in os.walk(base):
            for name in sorted(files):
                if not name.startswith("."):
                    path = Path(folder) / name
                    yield path.relative_to(self.root).as_posix(), path.stat().st_size


def _transient(exc: Exception) -> bool:
    """A failure worth trying again: no connection, a broken one, throttling or a 5xx."""
    if isinstance(exc, (BotoConnectionError, HTTPClientError)):
        return True
    if isinstance(exc, ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        return status >= 500 or exc.response.get("Error", {}).get("Code") in _TRANSIENT_CODES
    return False


class S3Store(ObjectStore):
    """Objects in an S3-compatible bucket; create-once with ``If-None-Match: *``; every call
    retried through transient failures under the registry's retry rule."""

    def __init__(self, bucket: str, prefix: str = "", *, endpoint_url: str | None = None,
                 max_pool_connections: int = 32, policy: RetryPolicy | None = None) -> None:
        self.bucket, self.prefix = bucket, prefix.strip("/")
        self.policy = policy or RetryPolicy.from_env()
        self.uri = f"s3://{bucket}" + (f"/{self.prefix}" if self.prefix else "")
        config = Config(
            retries={"mode": "standard", "max_attempts": S3_ATTEMPTS},
            max_pool_connections=max_pool_connections,
            tcp_keepalive=True,
            connect_timeout=5,
            read_timeout=30,
            request_checksum_calculation="when_required",  # we verify sha256 ourselves
            response_checksum_validation="when_required",
        )
        with _SESSION_LOCK:  # sessions are not thread-safe; one shared session caches the service model
            self.client = _SESSION.client("s3", endpoint_url=endpoint_url, config=config)

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _retried(self, operation: str, key: str, call: Callable[[], T]) -> T:
        """`call` under the retry rule; a refusal of these credentials is Forbidden, naming the key."""
        try:
            return self.policy.run("S3", operation, call, _transient)
        except NoCredentialsError as exc:
            raise RegistryError(f"S3 {operation} of {self.uri_for(key)}: no credentials found (set AWS_ACCESS_KEY_ID "
                                "and AWS_SECRET_ACCESS_KEY, a profile, or a role)") from exc
        except ClientError as exc:
            error = exc.response.get("Error", {})
            if error.get("Code") in _REFUSED_CODES:
                raise Forbidden(f"S3 refused {operation} of {self.uri_for(key)}: {error.get('Code')} "
                                "(the credentials in use may not touch this namespace)") from exc
            raise

    def put(self, key: str, data: bytes) -> bool:
        return self._retried("put", key, lambda: self._put(key, data))

    def _put(self, key: str, data: bytes) -> bool:
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, IfNoneMatch="*")
            return True
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code")
            if code in ("PreconditionFailed", "ConditionalRequestConflict"):
                return False
            if code == "NotImplemented":  # a store without conditional writes: content is addressed anyway
                self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data)
                return True
            raise

    def get(self, key: str) -> bytes | None:
        return self._retried("get", key, lambda: self._get(key))

    def _get(self, key: str) -> bytes | None:
        try:
            return self.client.get_object(Bucket=self.bucket, Key=self._key(key))["Body"].read()
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise

    def delete(self, key: str) -> None:
        self._retried("delete", key, lambda: self.client.delete_object(Bucket=self.bucket, Key=self._key(key)))

    def modified(self, key: str) -> float | None:
        return self._retried("head", key, lambda: self._modified(key))

    def _modified(self, key: str) -> float | None:
        try:
            return self.client.head_object(Bucket=self.bucket, Key=self._key(key))["LastModified"].timestamp()
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
                return None
            raise

    def delete_prefix(self, prefix: str) -> list[str]:
        """Batch deletes; a key a batch reports as not deleted is deleted alone, which raises if the
        store refuses it again (a batch answers 200 whatever became of each key)."""
        keys = [key for key, _ in self.list(prefix)]
        for start in range(0, len(keys), 1000):
            batch = [{"Key": self._key(k)} for k in keys[start:start + 1000]]
            answer = self._retried("delete", prefix, lambda batch=batch: self.client.delete_objects(
                Bucket=self.bucket, Delete={"Objects": batch, "Quiet": True}))
            for error in answer.get("Errors", []):
                self.delete(error["Key"].removeprefix(f"{self.prefix}/" if self.prefix else ""))
        return keys

    def list(self, prefix: str = "") -> Iterator[tuple[str, int]]:
        root = f"{self.prefix}/" if self.prefix else ""
        prefix = prefix if not prefix or prefix.endswith("/") else prefix + "/"
        request = {"Bucket": self.bucket, "Prefix": root + prefix}
        while True:
            page = self._retried("list", prefix, lambda request=dict(request): self.client.list_objects_v2(**request))
            for item in page.get("Contents", []):
                yield item["Key"][len(root):], item["Size"]
            if not page.get("IsTruncated"):
                return
            request["ContinuationToken"] = page["NextContinuationToken"]


def open_store(uri: str, *, endpoint_url: str | None = None, max_pool_connections: int = 32) -> ObjectStore:
    """A store for ``file:///path`` (or a plain path) or ``s3://bucket/prefix``."""
    parsed = urlparse(uri)
    if parsed.scheme == "s3":
        if not parsed.netloc:
            raise RegistryError(f"store URI {uri!r} names no bucket")
        return S3Store(parsed.netloc, parsed.path, endpoint_url=endpoint_url,
                       max_pool_connections=max_pool_connections)
    if parsed.scheme in ("file", ""):
        return FileStore(Path(unquote(parsed.path) if parsed.scheme else uri))
    raise RegistryError(f"unsupported store URI {uri!r}: use file://… or s3://bucket/prefix")
