"""The published index: each version carries, as a tag, the versions before it (identity,
fingerprints, job run), so a job plans a chunk of users from one search of registered models
(which reports each model's newest version with its tags) instead of searching each user's
versions, and a publish that knows the plan's answer writes its index in the version's own create.

A version's index names the version it was written after (`after`). It is trusted only when that
is the version just below it: every version number below it is then accounted for. A publish whose
plan was overtaken (another version was created meanwhile) gets a number further on, and settles
by reading the versions, then rewriting its index; until it has, or when it stopped before, the
planner asks MLflow for that user as before. Versions are immutable, so a trusted index is right
about every version it lists; a version it lists may since have been deleted (a twin, `gc`), which
whoever uses that version finds out by reading it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from prefixfleet.registry import refs
from prefixfleet.registry.catalog import ModelRecord, VersionRecord
from prefixfleet.registry.keys import UserKey

INDEX = refs.TAG + "index"
LISTED = 20  # versions an index lists, newest first: the newest 20 settle twins and aliases


@dataclass(frozen=True)
class Indexed:
    version: int
    identity: str
    data_fingerprint: str
    backbone_fingerprint: str
    run_id: str

    @classmethod
    def of(cls, version: int, tags: dict[str, str]) -> Indexed:
        return cls(version, tags.get(refs.IDENTITY, ""), tags.get(refs.DATA, ""), tags.get(refs.BACKBONE, ""),
                   tags.get(refs.RUN_ID, ""))


@dataclass(frozen=True)
class Published:
    """What one bulk read knows of one user: the production alias and the newest versions, newest
    first (`latest` is the first, 0 for none); `complete`: they are all the user's versions."""

    key: UserKey
    production: int | None = None
    versions: tuple[Indexed, ...] = ()
    complete: bool = True

    @property
    def latest(self) -> int:
        return self.versions[0].version if self.versions else 0

    def oldest(self, identity: str) -> Indexed | None:
        """The oldest listed version with this identity (the one exactly-once keeps)."""
        return next((v for v in reversed(self.versions) if v.identity == identity), None)

    def version(self, number: int) -> Indexed | None:
        return next((v for v in self.versions if v.version == number), None)


def index_after(published: Published) -> str:
    """The index of a version created right after what `published` lists."""
    return _tag(published.latest, published.versions[:LISTED - 1],
                published.complete and len(published.versions) < LISTED)


def index_of(records: list[VersionRecord], version: int, complete: bool) -> str:
    """The index of `version`, from a read of the versions (newest first) that saw all below it."""
    below = [Indexed.of(r.version, r.tags) for r in records if r.version < version]
    return _tag(version - 1, below[:LISTED - 1], complete and len(below) < LISTED)


def _tag(after: int, versions: tuple[Indexed, ...] | list[Indexed], complete: bool) -> str:
    return json.dumps({"after": after, "complete": complete,
                       "versions": [[v.version, v.identity, v.data_fingerprint, v.backbone_fingerprint, v.run_id]
                                    for v in versions]}, separators=(",", ":"))


def trusted(record: VersionRecord) -> bool:
    """Whether a version's own index accounts for every version below it."""
    return _listed(record.version, record.tags) is not None


def read_index(key: UserKey, model: ModelRecord | None) -> Published | None:
    """What the model's record says of the user; None when its newest version's index is missing
    or not trusted."""
    if model is None:
        return Published(key)
    production = model.aliases.get(refs.PRODUCTION)
    if model.latest == 0:
        return Published(key, production)
    listed = _listed(model.latest, model.latest_tags)
    if listed is None:
        return None
    below, complete = listed
    return Published(key, production, (Indexed.of(model.latest, model.latest_tags), *below), complete)


def _listed(version: int, tags: dict[str, str]) -> tuple[tuple[Indexed, ...], bool] | None:
    """(the versions below, complete) from a trusted index; None for none."""
    try:
        index = json.loads(tags[INDEX])
        if index["after"] != version - 1:
            return None
        below = tuple(Indexed(int(v), str(i), str(d), str(b), str(r)) for v, i, d, b, r in index["versions"])
        return below, bool(index["complete"])
    except (KeyError, TypeError, ValueError):
        return None
