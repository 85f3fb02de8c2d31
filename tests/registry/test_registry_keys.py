"""UserKey validation at the edge and its collision-free, reversible mappings."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mlflow.utils.validation import _validate_model_name

from prefixfleet.registry import InvalidUserKey, UserKey
from prefixfleet.registry.keys import MAX_ESCAPED_USER, escape, unescape

PREFIX = "pf"


@pytest.mark.parametrize("user_id, problem", [
    ("", "is empty"),
    (" alice", "whitespace"),
    ("alice\n", "whitespace"),
    ("al\x00ice", "control"),
    ("al\u200bice", "control"),  # zero-width space (format character)
    ("\ud800", "control"),  # lone surrogate
    ("ａlice", "NFKC"),  # fullwidth a
    ("e\u0301", "NFKC"),  # decomposed é
    ("p\u0430ypal", "mixes"),  # Cyrillic а inside Latin
    ("x" * (MAX_ESCAPED_USER + 1), "too long"),
    ("é" * 40, "too long"),  # 40 chars, 240 escaped
    (42, "must be a string"),
])
def test_unsafe_user_ids_are_rejected_with_the_reason(user_id, problem):
    with pytest.raises(InvalidUserKey, match=problem):
        UserKey("default", user_id)


@pytest.mark.parametrize("namespace", ["", "Default", "a.b", "a/b", "a:b", "-x", "x" * 33, "é"])
def test_bad_namespaces_are_rejected(namespace):
    with pytest.raises(InvalidUserKey, match="namespace"):
        UserKey(namespace, "alice")


def test_invalid_user_key_is_a_value_error():
    assert issubclass(InvalidUserKey, ValueError)


@pytest.mark.parametrize("user_id", ["..", ".", "../etc/passwd", "a/b", "c:d", "Alice", "alice", "ü", "用户",
                                     "a b", "x~2e", "~", "%2e", "a" * MAX_ESCAPED_USER])
def test_path_and_name_hostile_ids_are_escaped_not_mangled(user_id):
    key = UserKey("default", user_id)
    name = key.model_name(PREFIX)
    _validate_model_name(name)  # MLflow's own rule: no '/' or ':', no path tricks
    assert len(name) <= 256 and "/" not in key.escaped_user and "." not in key.escaped_user
    assert all(part not in ("", ".", "..") for part in key.object_key("0" * 64).split("/"))
    assert UserKey.from_model_name(name, PREFIX) == key


def test_case_differences_stay_distinct_on_case_insensitive_databases():
    upper, lower = UserKey("default", "Alice"), UserKey("default", "alice")
    assert upper.model_name(PREFIX).lower() != lower.model_name(PREFIX).lower()


def test_names_of_other_prefixes_or_shapes_are_not_ours():
    assert UserKey.from_model_name("other.default.alice", PREFIX) is None
    assert UserKey.from_model_name("pf.default", PREFIX) is None
    assert UserKey.from_model_name("pf.default.~zz", PREFIX) is None
    assert UserKey.from_model_name("pf.default.~61lice", PREFIX) is None  # non-canonical escape of 'a'


user_ids = st.text(min_size=1, max_size=40).filter(lambda s: _valid(lambda: UserKey("ns", s)))
namespaces = st.from_regex(r"[a-z0-9][a-z0-9_-]{0,31}", fullmatch=True)


def _valid(make) -> bool:
    try:
        make()
        return True
    except InvalidUserKey:
        return False


@settings(max_examples=400, deadline=None)
@given(st.tuples(namespaces, user_ids), st.tuples(namespaces, user_ids))
def test_different_keys_never_share_an_mlflow_name_or_object_key(a, b):
    ka, kb = UserKey(*a), UserKey(*b)
    if ka == kb:
        return
    assert ka.model_name(PREFIX) != kb.model_name(PREFIX)
    assert ka.object_dir != kb.object_dir
    assert not ka.object_key("f" * 64).startswith(kb.object_dir + "/")


@settings(max_examples=400, deadline=None)
@given(namespaces, user_ids)
def test_mapping_is_reversible(namespace, user_id):
    key = UserKey(namespace, user_id)
    assert UserKey.from_model_name(key.model_name(PREFIX), PREFIX) == key


@settings(max_examples=300, deadline=None)
@given(st.text(min_size=1, max_size=60))
def test_escape_round_trips_any_text(text):
    assert unescape(escape(text)) == text
