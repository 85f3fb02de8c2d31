"""The catalog interface, its plain records, its errors and the one mapping of MLflow's error codes
onto them (both backends raise through `mlflow_error`)."""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from prefixfleet.registry.errors import RegistryError

PAGE_MAX_MODELS = 1000  # MLflow's cap on registered models per search page
NAMES_PER_SEARCH = 100  # models named in one `name IN (…)` search
FILTER_CHARS = 3000  # of its filter: servers refuse request lines past about 4 KiB
VERSIONS_PER_PAGE = 10_000  # MLflow's default page of a version search (its cap is 200,000)


class Missing(RegistryError):
    """The registered model, version or alias does not exist."""


class AlreadyExists(RegistryError):
    """The registered model to create exists already."""


class Transient(RegistryError):
    """The backend was busy (locked database, version-number race, 5xx): safe to try again."""


_RACE_MARKERS = ("IntegrityError", "UNIQUE constraint failed", "duplicate key value", "Duplicate entry",
                 "database is locked", "Giving up after")


def is_write_race(message: str) -> bool:
    """An error MLflow reports when two writers collide on a row (alias or tag upsert, version
    number): the write did not happen and may be repeated."""
    return any(marker in message for marker in _RACE_MARKERS)


def mlflow_error(code: str, message: str, *, unavailable: bool = False, where: str = "MLflow") -> RegistryError:
    """Our error for an MLflow error code; `unavailable`: the transport said busy (5xx, 429)."""
    if code == "RESOURCE_DOES_NOT_EXIST" or (code == "INVALID_PARAMETER_VALUE" and "not found" in message):
        return Missing(message)
    if code == "RESOURCE_ALREADY_EXISTS":
        return AlreadyExists(message)
    if unavailable or code == "TEMPORARILY_UNAVAILABLE" or is_write_race(message):
        return Transient(f"{where}: {message}")
    return RegistryError(f"{where}: {message}")


@dataclass(frozen=True)
class VersionRecord:
    """A model version; `aliases` is filled by single-version reads only (MLflow's search omits it)."""

    name: str
    version: int
    source: str
    tags: dict[str, str] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()
    created_ms: int = 0


@dataclass(frozen=True)
class ModelRecord:
    name: str
    tags: dict[str, str] = field(default_factory=dict)
    aliases: dict[str, int] = field(default_factory=dict)
    latest: int = 0  # the newest live version (0: none); filled by gets and searches alike
    latest_tags: dict[str, str] = field(default_factory=dict)  # that version's tags

    def aliases_of(self, version: int) -> list[str]:
        return sorted(a for a, v in self.aliases.items() if v == version)


def name_batches(names: Iterable[str]) -> Iterator[list[str]]:
    """Names in batches of at most NAMES_PER_SEARCH names and FILTER_CHARS of `name IN (…)` filter
    (a search over REST is a GET: its filter travels in the request line)."""
    batch: list[str] = []
    chars = 0
    for name in names:
        if batch and (len(batch) == NAMES_PER_SEARCH or chars + len(name) + 4 > FILTER_CHARS):
            yield batch
            batch, chars = [], 0
        batch.append(name)
        chars += len(name) + 4
    if batch:
        yield batch


def _among(names: list[str]) -> str:
    return "name IN ({})".format(", ".join(f"'{n}'" for n in names))


class Catalog(ABC):
    """MLflow registry operations; each call is one request (REST) or one transaction (SQL)."""

    @abstractmethod
    def create_model(self, name: str, tags: dict[str, str]) -> bool:
        """Create a registered model; False when it already exists."""

    @abstractmethod
    def get_model(self, name: str) -> ModelRecord | None: ...

    @abstractmethod
    def delete_model(self, name: str) -> None:
        """Hard-delete the model with its versions, tags and aliases; raise Missing if absent."""

    @abstractmethod
    def search_models(self, filter_string: str, page_token: str | None) -> tuple[list[ModelRecord], str | None]:
        """One page (ordered by name) of models matching an MLflow filter (`name LIKE '…'`,
        `name IN ('…', …)`), aliases, tags and latest version included."""

    @abstractmethod
    def set_model_tag(self, name: str, key: str, value: str) -> None: ...

    @abstractmethod
    def create_version(self, name: str, source: str, tags: dict[str, str], run_id: str = "") -> VersionRecord:
        """A new version numbered max+1, linked to MLflow run `run_id` if given (MLflow's own field,
        which the UI links); raise Missing if the model does not exist."""

    @abstractmethod
    def set_version_tag(self, name: str, version: int, key: str, value: str) -> None: ...

    @abstractmethod
    def get_version(self, name: str, version: int) -> VersionRecord | None: ...

    @abstractmethod
    def get_version_by_alias(self, name: str, alias: str) -> VersionRecord | None:
        """None when the model, the alias or the version it names is missing."""

    @abstractmethod
    def search_versions(self, filter_string: str, *, order_by: str, max_results: int,
                        page_token: str | None = None) -> tuple[list[VersionRecord], str | None]: ...

    @abstractmethod
    def delete_version(self, name: str, version: int) -> None:
        """Delete a version (MLflow also drops aliases that point to it); raise Missing if absent."""

    @abstractmethod
    def set_alias(self, name: str, alias: str, version: int) -> None: ...

    @abstractmethod
    def delete_alias(self, name: str, alias: str) -> None: ...

    @abstractmethod
    def close(self) -> None:
        """Release connections."""

    def scan(self, pattern: str, cursor: str | None) -> tuple[list[tuple[ModelRecord, list[VersionRecord]]], str | None]:
        """One page, in name order, of the models whose names match `name LIKE pattern`, each with
        its live versions newest first, and the cursor of the next page (None after the last): the
        whole-registry read of fsck. Here a page of the model search, then its versions by batches
        of names (about 2 ms a model through MLflow's ORM)."""
        models, token = self.search_models(f"name LIKE '{pattern}'", cursor)
        versions = versions_named(self, [m.name for m in models])
        return [(m, versions[m.name]) for m in models], token



def models_named(catalog: Catalog, names: list[str]) -> dict[str, ModelRecord]:
    """The models among `names` that exist, a search per batch of names."""
    found: dict[str, ModelRecord] = {}
    for batch in name_batches(names):
        token: str | None = None
        while True:
            page, token = catalog.search_models(_among(batch), token)
            found.update((m.name, m) for m in page)
            if not token:
                break
    return found


def versions_named(catalog: Catalog, names: list[str]) -> dict[str, list[VersionRecord]]:
    """Every live version of each named model, newest first ([] for a model without one), a paged
    search per batch of names."""
    found: dict[str, list[VersionRecord]] = {name: [] for name in names}
    for batch in name_batches(names):
        token: str | None = None
        while True:
            page, token = catalog.search_versions(_among(batch), order_by="version_number DESC",
                                                  max_results=VERSIONS_PER_PAGE, page_token=token)
            for record in page:
                found[record.name].append(record)
            if not token:
                break
    return found
