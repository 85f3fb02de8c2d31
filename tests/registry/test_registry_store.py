"""Object stores: create-once writes, reads, listing, per-user deletion; on disk and on real S3."""
from __future__ import annotations

import pytest
from botocore.awsrequest import AWSResponse

from prefixfleet.registry import RegistryError
from prefixfleet.registry.store import FileStore, S3Store, open_store


@pytest.fixture(params=["file", pytest.param("s3", marks=pytest.mark.servers)])
def store(request, tmp_path):
    if request.param == "file":
        return FileStore(tmp_path / "store")
    endpoint, bucket = request.getfixturevalue("s3_endpoint"), request.getfixturevalue("s3_bucket")
    return S3Store(bucket, f"store-test/{tmp_path.name}", endpoint_url=endpoint)


def test_put_creates_once_and_never_overwrites(store):
    assert store.put("ns/ab/alice/x.safetensors", b"first") is True
    assert store.put("ns/ab/alice/x.safetensors", b"second") is False
    assert store.get("ns/ab/alice/x.safetensors") == b"first"
    assert store.get("ns/ab/alice/missing.safetensors") is None
    assert store.uri_for("ns/ab/alice/x.safetensors") == f"{store.uri}/ns/ab/alice/x.safetensors"


def test_listing_and_deleting_one_user_leaves_neighbours_alone(store):
    for key in ("ns/ab/alice/1", "ns/ab/alice/2", "ns/ab/alice2/1", "ns/cd/bob/1"):
        store.put(key, key.encode())
    assert sorted(store.list("ns/ab/alice")) == [("ns/ab/alice/1", 13), ("ns/ab/alice/2", 13)]
    assert sorted(store.delete_prefix("ns/ab/alice")) == ["ns/ab/alice/1", "ns/ab/alice/2"]
    assert sorted(k for k, _ in store.list()) == ["ns/ab/alice2/1", "ns/cd/bob/1"]
    store.delete("ns/cd/bob/1")
    store.delete("ns/cd/bob/1")  # absent: ignored
    assert [k for k, _ in store.list()] == ["ns/ab/alice2/1"]


def test_file_store_leaves_no_folder_named_after_a_deleted_user(tmp_path):
    store = FileStore(tmp_path)
    store.put("ns/ab/alice/1", b"x")
    store.put("ns/ab/carol/1", b"x")
    store.delete_prefix("ns/ab/alice")
    store.delete("ns/ab/carol/1")
    assert [p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")] == ["ns"]


def test_unsupported_uris_are_refused():
    with pytest.raises(RegistryError, match="unsupported store URI"):
        open_store("gs://bucket/x")
    with pytest.raises(RegistryError, match="names no bucket"):
        open_store("s3:///x")


@pytest.mark.servers
def test_transient_s3_errors_are_retried_by_botocore(s3_endpoint, s3_bucket):
    """A real server cannot be made to answer 503 on demand: the first attempt of each call is
    answered by a stub, the retry goes to the real server."""
    store = S3Store(s3_bucket, "retry-test", endpoint_url=s3_endpoint)
    attempts: list[str] = []

    def slow_down_once(request, **_):
        attempts.append(request.method)
        if len(attempts) % 2 == 1:
            return AWSResponse(request.url, 503, {}, _Raw(b"<Error><Code>SlowDown</Code></Error>"))
        return None

    store.client.meta.events.register("before-send.s3", slow_down_once)
    assert store.put("k", b"v") is True
    assert store.get("k") == b"v"
    assert attempts == ["PUT", "PUT", "GET", "GET"]


class _Raw:
    def __init__(self, body: bytes) -> None:
        self.body = body

    def stream(self, **_):
        yield self.body
