"""`prefixfleet get|history|promote|rollback|forget|fsck` against a temp home (embedded defaults)."""
from __future__ import annotations

import hashlib
import json

import pytest
from typer.testing import CliRunner

from prefixfleet.pipelines.cli import app
from prefixfleet.registry import Registry, UserKey
from tests.fixtures.artifacts import make_artifact


@pytest.fixture
def home(local_env):
    """A temp PREFIXFLEET_HOME where alice has versions 1 (production) and 2 (candidate)."""
    with Registry.from_env() as reg:
        key = UserKey("default", "alice")
        for data in ("d1", "d2"):
            reg.publish(key, make_artifact("default", "alice", data_fingerprint=data), metrics={"eval_loss": 1.0})
        reg.promote(key, 1)
    return local_env["PREFIXFLEET_HOME"]


def run(*args: str):
    return CliRunner().invoke(app, list(args))


def test_get_json_prints_the_contract_fields_and_out_writes_verified_bytes(home, tmp_path):
    result = run("get", "alice", "--json", "--out", str(tmp_path / "p.safetensors"))
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert {"namespace", "user_id", "version", "alias", "sha256", "size_bytes", "uri", "backbone_fingerprint",
            "data_fingerprint", "spec", "metrics"} <= payload.keys()
    assert (payload["version"], payload["alias"], payload["metrics"]) == (1, "production", {"eval_loss": 1.0})
    with Registry.from_env() as reg:
        assert (tmp_path / "p.safetensors").read_bytes() == reg.fetch(UserKey("default", "alice"))
    assert json.loads(run("get", "alice", "--alias", "candidate", "--json").stdout)["version"] == 2
    assert json.loads(run("get", "alice", "--version", "2", "--json").stdout)["version"] == 2
    assert "version 1" in run("get", "alice").stdout


def test_unknown_user_exits_1_with_one_line_reason(home):
    result = run("get", "nobody")
    assert result.exit_code == 1 and result.stdout == ""
    assert result.stderr.strip() == "error: no prefix for user 'nobody' in namespace 'default'"
    result = run("get", "alice", "--namespace", "other", "--json")
    assert result.exit_code == 1 and "namespace 'other'" in result.stderr
    assert run("get", "bad\x00id").exit_code == 2


def test_history_promote_rollback(home):
    history = json.loads(run("history", "alice", "--json").stdout)
    assert [(v["version"], v["aliases"]) for v in history["versions"]] == [(2, ["candidate"]), (1, ["production"])]
    promoted = run("promote", "alice", "2", "--json")
    assert promoted.exit_code == 0 and json.loads(promoted.stdout)["version"] == 2
    assert json.loads(run("rollback", "alice", "--json").stdout)["version"] == 1
    second = run("rollback", "alice")
    assert second.exit_code == 1 and "no earlier production version" in second.stderr
    assert run("promote", "alice", "9").exit_code == 1


def test_forget_prints_a_receipt_and_leaves_nothing(home):
    result = run("forget", "alice", "--json")
    receipt = json.loads(result.stdout)
    assert result.exit_code == 0 and receipt["versions"] == [2, 1] and len(receipt["objects"]) == 2
    assert receipt["aliases"] == {"candidate": 2, "production": 1}
    assert run("get", "alice").exit_code == 1


def _publish_many(users: list[str]) -> None:
    with Registry.from_env() as reg:
        for i, user in enumerate(users):
            reg.publish(UserKey("default", user), make_artifact("default", user, seed=i), metrics={"eval_loss": 1.0})


def test_forget_users_file_prints_a_receipt_line_per_user_and_a_total(home, tmp_path):
    users = ["bob", "carol", "dan with spaces", "erin"]
    _publish_many(users)
    plain = tmp_path / "users.txt"
    plain.write_text("alice\n\nbob\r\nnobody\ncarol\n")  # blank lines skipped, CRLF read as LF
    result = run("forget", "--users-file", str(plain))
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines() == [
        "forgot default/alice: 2 versions, 2 aliases, 2 artifacts",
        "forgot default/bob: 1 versions, 1 aliases, 1 artifacts",
        "forgot default/nobody: 0 versions, 0 aliases, 0 artifacts",
        "forgot default/carol: 1 versions, 1 aliases, 1 artifacts",
        "forgot 4 of 4 users: 4 versions, 4 artifacts; 0 failed"]

    per_user = tmp_path / "per_user.jsonl"  # as a job's --per-user-out writes it
    per_user.write_text("".join(json.dumps({"namespace": "default", "user_id": u, "status": "trained"}) + "\n"
                                for u in users[2:]))
    result = run("forget", "--users-file", str(per_user), "--json", "--workers", "2")
    assert result.exit_code == 0, result.output
    *receipts, total = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(r["user_id"], r["versions"]) for r in receipts] == [("dan with spaces", [1]), ("erin", [1])]
    assert total == {"users": 2, "forgotten": 2, "failed": 0, "versions": 2, "artifacts": 2}
    with Registry.from_env() as reg:
        assert list(reg.list_users("default")) == []


def test_a_users_file_with_bad_lines_is_refused_whole_naming_each_line(home, tmp_path):
    _publish_many(["bob"])
    plain = tmp_path / "users.txt"
    plain.write_text("bob\nbad\x00id\n" + "x" * 300 + "\n")
    result = run("forget", "--users-file", str(plain))
    assert result.exit_code == 2 and result.stdout == ""
    assert f"bad line {plain}:2: user id 'bad\\x00id'" in result.stderr
    assert f"bad line {plain}:3: user id" in result.stderr
    assert "2 bad line(s) in" in result.stderr and "nothing was forgotten" in result.stderr
    lines = tmp_path / "users.jsonl"
    lines.write_text('{"user_id": "bob"}\n{"user": "bob"}\nnot json\n{"user_id": "bob", "namespace": "a/b"}\n')
    result = run("forget", "--users-file", str(lines))
    assert result.exit_code == 2
    for number, reason in [(2, "expected a JSON object with a user_id"), (3, "not JSON"), (4, "namespace 'a/b'")]:
        assert f"bad line {lines}:{number}: {reason}" in result.stderr
    with Registry.from_env() as reg:  # nothing was erased
        assert {k.user_id for k in reg.list_users("default")} == {"alice", "bob"}
    assert run("forget", "bob", "--users-file", str(plain)).exit_code == 2
    assert run("forget").exit_code == 2
    assert run("forget", "--users-file", str(tmp_path / "missing.txt")).exit_code == 2
    assert run("forget", "--users-file", str(plain), "--workers", "0").exit_code == 2


def test_fsck_reports_then_repairs(home):
    with Registry.from_env() as reg:
        orphan = make_artifact("default", "ghost")
        reg.store.put(UserKey("default", "ghost").object_key(hashlib.sha256(orphan).hexdigest()), orphan)
    young = run("fsck", "--repair", "--json")  # just written: a publish may be creating its version
    assert young.exit_code == 0 and json.loads(young.stdout)["faults"] == []
    assert len(json.loads(young.stdout)["in_flight"]) == 1
    found = run("fsck", "--grace", "0", "--json")
    assert found.exit_code == 1 and "run with --repair" in found.stderr
    assert [f["kind"] for f in json.loads(found.stdout)["faults"]] == ["orphan_artifact"]
    repaired = run("fsck", "--repair", "--grace", "0", "--json")
    assert repaired.exit_code == 0 and json.loads(repaired.stdout)["faults"][0]["repaired"] is True
    clean = run("fsck", "--grace", "0")
    assert clean.exit_code == 0 and "0 faults, 0 left alone" in clean.stdout
    assert run("fsck", "--grace", "-1").exit_code == 2


def test_home_option_selects_another_home(home, tmp_path, mlflow_db_template):
    other = tmp_path / "other-home"
    other.mkdir()
    (other / "mlflow.db").write_bytes(mlflow_db_template.read_bytes())
    assert run("get", "alice", "--home", str(other)).exit_code == 1
    assert run("get", "alice", "--home", home).exit_code == 0
