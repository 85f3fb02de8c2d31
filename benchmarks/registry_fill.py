"""Filling a registry with many published users fast, for the scale benchmarks: the rows a first
publish + promote writes (model, its two tags, version 1 with its tags and index, `candidate` and
`production`), built by the product's own tag code and written to MLflow's SQL tables in bulk,
and each artifact put through the registry's own store. `check_equivalent` holds the fill to that
promise: users filled here and the same users published through `Registry.publish` leave the
same rows, but for the timestamps and the publish token.

At today's publish rate (about 20/s) a million users would take half a day to publish; this
writes them at thousands a second. Only the fill is fast: what is measured goes through the product.
"""
from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import islice

import numpy as np
import sqlalchemy as sa
from safetensors.numpy import save

from prefixfleet.registry import Registry, UserKey, refs
from prefixfleet.registry.header import read_header
from prefixfleet.registry.index import INDEX, Published, index_after
from prefixfleet.workers import artifact_format

ALIASES = ["candidate", refs.PRODUCTION]
WORKSPACE = "default"  # MLflow 3's workspace column; the registry uses the default one
TABLES = ("registered_models", "registered_model_tags", "model_versions", "model_version_tags",
          "registered_model_aliases")


@dataclass(frozen=True)
class Template:
    """What every filled user shares: the job settings and backbone its artifact records."""

    spec: str  # PrefixSpec.to_json()
    settings: str  # TrainConfig.settings_json(method)
    backbone_fingerprint: str
    tokens: int = 8
    width: int = 64

    def artifact(self, key: UserKey, data_fingerprint: str) -> bytes:
        meta = artifact_format.metadata(namespace=key.namespace, user_id=key.user_id, spec=self.spec,
                                        backbone_fingerprint=self.backbone_fingerprint,
                                        data_fingerprint=data_fingerprint, settings=self.settings)
        return save({"prompt_embeddings": np.zeros((self.tokens, self.width), dtype=np.float32)}, metadata=meta)


def _rows(registry: Registry, key: UserKey, artifact: bytes, run_id: str, now_ms: int) -> dict[str, list[dict]]:
    header = read_header(artifact)
    sha256 = hashlib.sha256(artifact).hexdigest()
    tags = refs.version_tags(header, sha256, len(artifact), metrics={"eval_loss": 1.0}, run_id=run_id,
                             aliases=ALIASES, tags=None)
    tags[refs.PUBLISH_TOKEN] = uuid.uuid4().hex
    tags[INDEX] = index_after(Published(key))
    name = key.model_name(registry.prefix)
    object_key = key.object_key(sha256)
    registry.store.put(object_key, artifact)
    source = registry.store.uri_for(object_key)
    ws = {"workspace": WORKSPACE}
    return {
        "registered_models": [{"name": name, "creation_time": now_ms, "last_updated_time": now_ms,
                               "description": None, **ws}],
        "registered_model_tags": [{"key": k, "value": v, "name": name, **ws} for k, v in refs.model_tags(key).items()],
        "model_versions": [{"name": name, "version": 1, "creation_time": now_ms, "last_updated_time": now_ms,
                            "description": None, "user_id": None, "current_stage": "None", "source": source,
                            "run_id": tags[refs.RUN_ID], "status": "READY", "status_message": None,
                            "run_link": None, "storage_location": source, **ws}],
        "model_version_tags": [{"key": k, "value": v, "name": name, "version": 1, **ws} for k, v in tags.items()],
        "registered_model_aliases": [{"alias": a, "version": 1, "name": name, **ws} for a in ALIASES],
    }


def fill(registry: Registry, artifacts: Iterable[tuple[UserKey, bytes]], run_id: str, *,
         batch: int = 2000, progress: Callable[[int], None] | None = None) -> int:
    """Publish-and-promote rows for every (key, artifact) of `artifacts`, users not published before."""
    registry.catalog.get_model("bench-fill-creates-the-tables")
    engine = sa.create_engine(registry.tracking_uri)
    tables = {name: sa.Table(name, sa.MetaData(), autoload_with=engine) for name in TABLES}
    done = 0
    for chunk in _chunks(artifacts, batch):
        now_ms = int(time.time() * 1000)
        rows: dict[str, list[dict]] = {name: [] for name in TABLES}
        for key, artifact in chunk:
            for table, part in _rows(registry, key, artifact, run_id, now_ms).items():
                rows[table].extend(part)
        with engine.begin() as conn:
            for name in TABLES:  # in foreign-key order
                conn.execute(tables[name].insert(), rows[name])
        done += len(chunk)
        if progress:
            progress(done)
    engine.dispose()
    return done


def check_equivalent(filled: Registry, published: Registry, artifacts: list[tuple[UserKey, bytes]],
                     run_id: str) -> None:
    """Raise AssertionError unless `fill` into `filled` and `Registry.publish` into `published`
    (both new to these users) leave the same rows for them."""
    fill(filled, artifacts, run_id)
    for key, artifact in artifacts:
        published.publish(key, artifact, metrics={"eval_loss": 1.0}, run_id=run_id, promote=True)
    for key, _ in artifacts:
        ours, theirs = _dump(filled, key), _dump(published, key)
        assert ours == theirs, f"{key}: the fill differs from a publish:\n{ours}\n{theirs}"


_VOLATILE = {"creation_time", "last_updated_time", "source", "storage_location"}
_VOLATILE_TAGS = {refs.PUBLISH_TOKEN, refs.CREATED_AT}


def _dump(registry: Registry, key: UserKey) -> dict[str, list[tuple]]:
    engine = sa.create_engine(registry.tracking_uri)
    name = key.model_name(registry.prefix)
    out: dict[str, list[tuple]] = {}
    with engine.connect() as conn:
        for table in TABLES:
            rows = conn.execute(sa.text(f"SELECT * FROM {table} WHERE name = :name"), {"name": name}).mappings()
            out[table] = sorted(
                tuple(sorted((k, v) for k, v in row.items() if k not in _VOLATILE))
                for row in rows if row.get("key") not in _VOLATILE_TAGS)
    engine.dispose()
    return out


def _chunks(items: Iterable, size: int) -> Iterator[list]:
    iterator = iter(items)
    while chunk := list(islice(iterator, size)):
        yield chunk
