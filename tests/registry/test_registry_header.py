"""Reading the artifact header without torch: binding, completeness, identity."""
from __future__ import annotations

import json

import pytest

from prefixfleet.registry import IntegrityError, UserKey
from prefixfleet.registry.header import identity, read_header
from prefixfleet.workers.spec import PrefixSpec
from tests.fixtures.artifacts import DEFAULT_SPEC, make_artifact


def test_header_gives_the_binding_and_the_exact_size():
    data = make_artifact("ns", "alice", data_fingerprint="d", backbone_fingerprint="b")
    header = read_header(data)
    fields = (header.namespace, header.user_id, header.data_fingerprint, header.backbone_fingerprint)
    assert fields == ("ns", "alice", "d", "b")
    assert header.expected_size == len(data)
    header.check_binding(UserKey("ns", "alice"))


@pytest.mark.parametrize("other", [UserKey("ns", "bob"), UserKey("other", "alice")])
def test_binding_to_another_user_or_namespace_is_refused(other):
    with pytest.raises(IntegrityError, match="belongs to user 'alice' in namespace 'ns'"):
        read_header(make_artifact("ns", "alice")).check_binding(other)


@pytest.mark.parametrize("cut", [0, 5, 8, 20, -1])
def test_truncated_artifacts_are_refused(cut):
    data = make_artifact("ns", "alice")
    with pytest.raises(IntegrityError, match="truncated|bytes|malformed"):
        read_header(data[:cut])


def test_appended_bytes_are_refused():
    with pytest.raises(IntegrityError, match="header describes"):
        read_header(make_artifact("ns", "alice") + b"\0")


def _with_metadata(metadata: dict) -> bytes:
    header = json.dumps({"__metadata__": metadata}).encode()
    return len(header).to_bytes(8, "little") + header


def test_foreign_or_incomplete_metadata_is_refused():
    with pytest.raises(IntegrityError, match="not a prefixfleet/1 artifact"):
        read_header(_with_metadata({"format": "pt"}))
    with pytest.raises(IntegrityError, match="lacks .*user_id"):
        read_header(_with_metadata({"format": "prefixfleet/1", "namespace": "ns"}))
    with pytest.raises(IntegrityError, match="malformed"):
        read_header((4).to_bytes(8, "little") + b"[1,2")


def test_identity_ignores_spec_formatting_but_not_content():
    spec = json.dumps(DEFAULT_SPEC)
    reordered = json.dumps(dict(reversed(list(DEFAULT_SPEC.items()))), indent=2)
    assert identity("d", spec, "b") == identity("d", reordered, "b")
    assert identity("d", spec, "b") != identity("d", json.dumps({**DEFAULT_SPEC, "num_virtual_tokens": 9}), "b")
    assert identity("d", spec, "b") != identity("d2", spec, "b") != identity("d", spec, "b2")


def test_the_registry_tests_use_a_spec_the_product_accepts():
    assert PrefixSpec.from_dict(DEFAULT_SPEC).to_dict() == DEFAULT_SPEC
