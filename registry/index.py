"""The published index: a model tag listing a user's newest versions (identity, fingerprints, job
run), written at the end of each publish, so a job plans a chunk of users from one search of
registered models instead of searching each user's versions.

A tag is trusted only when it describes the model's newest live version: a publish that raced it,
or stopped before writing it, leaves it stale, and the planner then asks MLflow for that user as
before. Versions are immutable, so an index that names the newest version is right about every
version it lists; a version it lists may since have been deleted (a twin, `gc`), which whoever
uses that version finds out by reading it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from prefixfleet.registry import refs
from prefixfleet.registry.catalog import ModelRecord, VersionRecord
from prefixfleet.registry.keys import UserKey

PUBLISHED = refs.TAG + "published"


@dataclass(frozen=True)
class Indexed:
    version: int
    identity: str
    data_fingerprint: str
    backbone_fingerprint: str
    run_id: str


@dataclass(frozen=True)
class Published:
    """What one bulk read knows of one user: the production alias and the newest versions, newest
    first; `complete`: they are all the user's versions."""

    key: UserKey
    production: int | None = None
    versions: tuple[Indexed, ...] = ()
    complete: bool = True

    def oldest(self, identity: str) -> Indexed | None:
        """The oldest listed version with this identity (the one exactly-once keeps)."""
        return next((v for v in reversed(self.versions) if v.identity == identity), None)

    def version(self, number: int) -> Indexed | None:
        return next((v for v in self.versions if v.version == number), None)


def index_tag(records: list[VersionRecord], complete: bool) -> str:
    """The tag's value for these version records (newest first)."""
    return json.dumps({"latest": max((r.version for r in records), default=0), "complete": complete,
                       "versions": [[r.version, r.tags.get(refs.IDENTITY, ""), r.tags.get(refs.DATA, ""),
                                     r.tags.get(refs.BACKBONE, ""), r.tags.get(refs.RUN_ID, "")]
                                    for r in records]}, separators=(",", ":"))


def read_index(key: UserKey, model: ModelRecord | None) -> Published | None:
    """What the model's record says of the user; None when its index is missing or stale."""
    if model is None:
        return Published(key)
    try:
        index = json.loads(model.tags[PUBLISHED])
        if index["latest"] != model.latest:
            return None
        versions = tuple(Indexed(int(v), str(i), str(d), str(b), str(r)) for v, i, d, b, r in index["versions"])
        return Published(key, model.aliases.get(refs.PRODUCTION), versions, bool(index["complete"]))
    except (KeyError, TypeError, ValueError):
        return None
