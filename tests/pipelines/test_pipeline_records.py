"""What a job run stores names users by pseudonym only: the rows, and every spelling of the id in
their reasons, so a `forget` leaves nothing of the user in job runs."""
from __future__ import annotations

from prefixfleet.pipelines.training.outcome import FORGOTTEN, Outcome, scrub
from prefixfleet.registry import Forgotten, UserKey


def test_scrub_replaces_every_spelling_of_the_id_and_nothing_else():
    key = UserKey("default", "O'Brien\\bob")
    text = (f"{key}: artifact missing from s3://b/default/ab/{key.escaped_user}/x.safetensors; "
            f"model pf.default.{key.escaped_user}; worker said user 'default/{key.user_id}'; "
            "not O'Brien\\bobby")
    scrubbed = scrub(text, key, "u-123")
    assert key.user_id not in scrubbed.replace("O'Brien\\bobby", "")
    assert repr(key.user_id)[1:-1] not in scrubbed and key.escaped_user not in scrubbed
    assert scrubbed.count("u-123") == 4 and scrubbed.endswith("not O'Brien\\bobby")
    short = UserKey("default", "a")
    assert scrub("no prefix for user 'a' in namespace 'default'", short, "u-1") == \
        "no prefix for user 'u-1' in namespace 'default'"


def test_a_stored_row_names_the_user_by_pseudonym_only():
    key = UserKey("team-a", "Zoë")
    outcome = Outcome.failed(key, f"user 'team-a/{key.user_id}': no training examples")
    row = outcome.to_record("u-abc")
    assert "user_id" not in row and (row["namespace"], row["user"]) == ("team-a", "u-abc")
    assert "Zoë" not in repr(row) and row["reason"] == "user 'team-a/u-abc': no training examples"
    assert outcome.to_json()["user_id"] == "Zoë"  # what the operator's terminal gets keeps the id


def test_a_user_forgotten_during_the_job_is_skipped_not_failed():
    outcome = Outcome.from_error(UserKey("default", "gone"), Forgotten("…"))
    assert (outcome.status, outcome.reason, outcome.unavailable) == ("skipped", FORGOTTEN, False)
