"""infra/bucket_policy.py: each namespace's principal is scoped to exactly its own key prefix."""
from __future__ import annotations

import json
import re
from fnmatch import fnmatchcase
from typing import Any

import pytest

from infra.bucket_policy import (
    TEMPLATE,
    bucket_policy,
    identity_policy,
    main,
    namespace_statements,
)

STORE = "s3://prefixfleet/fleet"
ROLE = "arn:aws:iam::123456789012:role/{}"
OBJECT_ACTIONS = {"s3:GetObject", "s3:PutObject", "s3:DeleteObject"}


def _object_patterns(statements: list[dict[str, Any]]) -> set[str]:
    """Every object-key pattern the statements name (Resource, NotResource, s3:prefix)."""
    patterns = set()
    for statement in statements:
        for key in ("Resource", "NotResource"):
            value = statement.get(key)
            if value and value.startswith("arn:aws:s3:::prefixfleet/"):
                patterns.add(value.removeprefix("arn:aws:s3:::prefixfleet/"))
        prefix = statement.get("Condition", {}).get("StringLike", {}).get("s3:prefix")
        if prefix:
            patterns.add(prefix)
    return patterns


def test_rendered_policy_is_valid_json_with_every_placeholder_filled() -> None:
    policy = bucket_policy(STORE, {"acme": ROLE.format("acme")})
    text = json.dumps(policy)
    assert json.loads(text) == policy
    assert "${" not in text and "$" not in text
    placeholders = set(re.findall(r"\$\{(\w+)\}", TEMPLATE.read_text()))
    assert placeholders == {"BUCKET", "PREFIX", "PRINCIPAL"}, "infra/README.md documents these for envsubst"


def test_one_namespace_is_scoped_to_exactly_its_prefix() -> None:
    statements = namespace_statements(STORE, "acme", ROLE.format("acme"))
    assert _object_patterns(statements) == {"fleet/acme/*"}
    assert {json.dumps(s["Principal"]) for s in statements} == {json.dumps({"AWS": ROLE.format("acme")})}
    allowed = set().union(*(
        {s["Action"]} if isinstance(s["Action"], str) else set(s["Action"])
        for s in statements if s["Effect"] == "Allow"
    ))
    assert OBJECT_ACTIONS | {"s3:ListBucket"} <= allowed
    (deny,) = [s for s in statements if s["Effect"] == "Deny"]
    assert set(deny["Action"]) >= OBJECT_ACTIONS and deny["NotResource"].endswith("/fleet/acme/*")


@pytest.mark.parametrize("first,second", [("acme", "beta"), ("team", "team-a"), ("a", "a.b"), ("x1", "x10")])
def test_two_namespaces_never_overlap(first: str, second: str) -> None:
    policy = bucket_policy(STORE, {first: ROLE.format(first), second: ROLE.format(second)})
    by_principal: dict[str, list[dict[str, Any]]] = {}
    for statement in policy["Statement"]:
        by_principal.setdefault(statement["Principal"]["AWS"], []).append(statement)
    assert len({s["Sid"] for s in policy["Statement"]}) == len(policy["Statement"]), "Sids must be unique"
    mine, theirs = (_object_patterns(by_principal[ROLE.format(ns)]) for ns in (first, second))
    assert mine == {f"fleet/{first}/*"} and theirs == {f"fleet/{second}/*"}
    for namespace, own, other in ((first, mine, theirs), (second, theirs, mine)):
        for key in (f"fleet/{namespace}/ab/user/0123.safetensors", f"fleet/{namespace}/x"):
            assert any(fnmatchcase(key, pattern) for pattern in own)
            assert not any(fnmatchcase(key, pattern) for pattern in other)


def test_store_without_prefix_scopes_to_the_namespace_at_the_bucket_root() -> None:
    assert _object_patterns(namespace_statements("s3://prefixfleet", "acme", ROLE.format("acme"))) == {"acme/*"}


def test_identity_form_has_no_principal_and_no_deny() -> None:
    statements = identity_policy(STORE, "acme")["Statement"]
    assert statements and all(s["Effect"] == "Allow" and "Principal" not in s for s in statements)
    assert _object_patterns(statements) == {"fleet/acme/*"}


@pytest.mark.parametrize("namespace", ["", "a/b", "*", "a*", "x?", "..", "../etc", ".hidden", "a" * 129, "ü"])
def test_unsafe_namespaces_are_refused(namespace: str) -> None:
    with pytest.raises(ValueError, match="namespace"):
        namespace_statements(STORE, namespace, ROLE.format("x"))


@pytest.mark.parametrize(
    "store,principal",
    [("prefixfleet/fleet", ROLE.format("a")), ("s3://Bad_Bucket/x", ROLE.format("a")),
     ("s3://prefixfleet/fl*", ROLE.format("a")), (STORE, "*"), (STORE, "arn:aws:iam::123456789012:role/*")],
)
def test_bad_store_or_principal_is_refused(store: str, principal: str) -> None:
    with pytest.raises(ValueError):
        namespace_statements(store, "acme", principal)


def test_too_many_namespaces_for_one_bucket_policy_is_refused() -> None:
    with pytest.raises(ValueError, match="identity"):
        bucket_policy(STORE, {f"tenant{i}": ROLE.format(f"tenant{i}") for i in range(100)})


def test_cli_prints_json_or_a_one_line_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([STORE, f"acme={ROLE.format('acme')}", f"beta={ROLE.format('beta')}"]) == 0
    assert len(json.loads(capsys.readouterr().out)["Statement"]) == 6
    assert main([STORE, "--identity", "acme"]) == 0
    assert "Principal" not in capsys.readouterr().out
    assert main([STORE, "a/b=" + ROLE.format("x")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1
