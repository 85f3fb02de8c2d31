"""Session-wide fixtures: real servers on loopback and isolated registries on them or on local files.

- `mlflow_server` / `mlflow_server_uri`: a real `mlflow server` (sqlite, one worker);
  `mlflow_server.workdir / "mlflow.db"` is its database, for tests that inspect every row.
- `s3_endpoint`, `s3_bucket`: a real S3-compatible server (moto, a subprocess) and a bucket;
  dummy AWS credentials are in the environment while they run.
- `local_registry`: sqlite in-process + file:// store in a temp home (`local_registry_home`).
- `server_registry`: the real servers, with its own model-name prefix and bucket folder.
- `postgres`: a real PostgreSQL server (Debian's package, a private cluster on 127.0.0.1);
  `postgres.database()` is a fresh database with MLflow's schema.
- `pg_mlflow_server`: a real `mlflow server --workers 2` on a PostgreSQL database.
- `postgres_registry` / `pg_server_registry`: MLflow on PostgreSQL in-process / behind that
  server, artifacts in the S3-compatible server.
- `registry`: parametrized over all four; the registry contract suite runs on each.
- `make_server_registry()`: a factory for more isolated server registries.
- `local_env` / `server_env`: set PREFIXFLEET_HOME / MLFLOW_TRACKING_URI, PREFIXFLEET_STORE,
  AWS_ENDPOINT_URL and PREFIXFLEET_MODEL_PREFIX so that `Registry.from_env()` (and the CLI)
  land on an isolated registry; they return the variables set.
- `local_ray`: Ray on this machine with 2 CPUs, one for the whole session.
- `tiny_backbones`: the one tiny-backbone builder (`tests/fixtures/backbones.py`), session-wide.

Servers start in the background as soon as collection shows a test that needs them.
"""
from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable, Iterator
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from prefixfleet.registry import Registry
from tests.fixtures import servers
from tests.fixtures.postgres import PostgresServer

if TYPE_CHECKING:
    from tests.fixtures.backbones import TinyBackbones

_SERVER_FIXTURES = {"mlflow_server", "mlflow_server_uri", "s3_endpoint", "s3_bucket", "server_registry",
                    "make_server_registry", "server_env"}
_POSTGRES_FIXTURES = {"postgres", "pg_mlflow_server", "postgres_registry", "pg_server_registry"}
_REGISTRY_ON_SERVERS = ("servers", "postgres", "pg-servers")
_LAUNCHED = pytest.StashKey[dict[str, "servers.ServerProcess | PostgresServer"]]()


def _registry_param(item: pytest.Item) -> str | None:
    callspec = getattr(item, "callspec", None)
    return callspec.params.get("registry") if callspec is not None else None


def _needs_servers(item: pytest.Item) -> bool:
    names = set(getattr(item, "fixturenames", ()))
    return bool(names & (_SERVER_FIXTURES | _POSTGRES_FIXTURES)) or _registry_param(item) in _REGISTRY_ON_SERVERS


def _needs_postgres(item: pytest.Item) -> bool:
    names = set(getattr(item, "fixturenames", ()))
    return bool(names & _POSTGRES_FIXTURES) or _registry_param(item) in ("postgres", "pg-servers")


def pytest_collection_finish(session: pytest.Session) -> None:
    """Launch the servers now, without waiting, so they boot while the first tests run."""
    launched: dict[str, servers.ServerProcess | PostgresServer] = {}
    session.config.stash[_LAUNCHED] = launched
    if session.config.option.collectonly:
        return
    def launch(kind: str, start: Callable[[], servers.ServerProcess | PostgresServer]) -> None:
        launched[kind] = start()
        session.config.add_cleanup(launched[kind].stop)  # at once: a later launch may fail

    if any(_needs_postgres(item) for item in session.items):
        launch("postgres", PostgresServer.launch)
    if any(_needs_servers(item) for item in session.items):
        root = Path(tempfile.mkdtemp(prefix="prefixfleet-servers-"))
        template = _template_path(session.config)
        launch("mlflow", lambda: servers.launch_mlflow_server(root / "mlflow", owns_workdir=True, template_db=template))
        launch("s3", lambda: servers.launch_s3_server(root / "s3", owns_workdir=True))


def _template_path(config: pytest.Config) -> Path:
    """A migrated MLflow sqlite database, cached across runs per MLflow version."""
    folder = config.cache.mkdir("prefixfleet-mlflow-db")
    return servers.make_template_db(folder / f"mlflow-{version('mlflow')}.db")


def _server(config: pytest.Config, kind: str, tmp_path_factory: pytest.TempPathFactory) -> servers.ServerProcess:
    launched = config.stash.setdefault(_LAUNCHED, {})
    if kind not in launched:
        workdir = tmp_path_factory.mktemp(kind)
        if kind == "mlflow":
            launched[kind] = servers.launch_mlflow_server(workdir, template_db=_template_path(config))
        elif kind == "pg-mlflow":
            backend = _postgres(config).database()
            launched[kind] = servers.launch_mlflow_server(workdir, workers=2, backend_uri=backend,
                                                          env=servers.SERVER_POOL)
        else:
            launched[kind] = servers.launch_s3_server(workdir)
        config.add_cleanup(launched[kind].stop)
    server = launched[kind]
    assert isinstance(server, servers.ServerProcess)
    return server.wait()


def _postgres(config: pytest.Config) -> PostgresServer:
    launched = config.stash.setdefault(_LAUNCHED, {})
    if "postgres" not in launched:
        launched["postgres"] = PostgresServer.launch()
        config.add_cleanup(launched["postgres"].stop)
    server = launched["postgres"]
    assert isinstance(server, PostgresServer)
    server.wait()
    server.migrate_template()
    return server


@pytest.fixture(scope="session")
def aws_test_env() -> Iterator[dict[str, str]]:
    with pytest.MonkeyPatch.context() as mp:
        for name, value in servers.AWS_TEST_ENV.items():
            mp.setenv(name, value)
        mp.delenv("AWS_PROFILE", raising=False)
        yield servers.AWS_TEST_ENV


@pytest.fixture(scope="session")
def mlflow_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> servers.ServerProcess:
    return _server(request.config, "mlflow", tmp_path_factory)


@pytest.fixture(scope="session")
def mlflow_server_uri(mlflow_server: servers.ServerProcess) -> str:
    return mlflow_server.url


@pytest.fixture(scope="session")
def s3_endpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory,
                aws_test_env: dict[str, str]) -> str:
    return _server(request.config, "s3", tmp_path_factory).url


@pytest.fixture(scope="session")
def s3_bucket(s3_endpoint: str) -> str:
    return servers.create_bucket(s3_endpoint, "prefixfleet-test")


@pytest.fixture(scope="session")
def mlflow_db_template(request: pytest.FixtureRequest) -> Path:
    """A migrated MLflow sqlite database, cached across runs per MLflow version."""
    return _template_path(request.config)


@pytest.fixture
def local_registry_home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def local_registry(local_registry_home: Path, mlflow_db_template: Path) -> Iterator[Registry]:
    with servers.make_local_registry(local_registry_home, mlflow_db_template) as reg:
        yield reg


@pytest.fixture
def make_server_registry(mlflow_server_uri: str, s3_endpoint: str, s3_bucket: str) -> Iterator[Callable[..., Registry]]:
    made: list[Registry] = []

    def make(**kwargs: object) -> Registry:
        made.append(servers.make_server_registry(mlflow_server_uri, s3_endpoint, s3_bucket, **kwargs))
        return made[-1]

    yield make
    for reg in made:
        reg.close()


@pytest.fixture
def server_registry(make_server_registry: Callable[..., Registry]) -> Registry:
    return make_server_registry()


@pytest.fixture(scope="session")
def postgres(request: pytest.FixtureRequest) -> PostgresServer:
    return _postgres(request.config)


@pytest.fixture(scope="session")
def pg_mlflow_server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> servers.ServerProcess:
    return _server(request.config, "pg-mlflow", tmp_path_factory)


@pytest.fixture
def postgres_registry(postgres: PostgresServer, s3_endpoint: str, s3_bucket: str) -> Iterator[Registry]:
    """MLflow's SQL store on a fresh PostgreSQL database, in this process; artifacts in S3."""
    with servers.make_server_registry(postgres.database(), s3_endpoint, s3_bucket) as reg:
        yield reg


@pytest.fixture
def pg_server_registry(pg_mlflow_server: servers.ServerProcess, s3_endpoint: str, s3_bucket: str) -> Iterator[Registry]:
    with servers.make_server_registry(pg_mlflow_server.url, s3_endpoint, s3_bucket) as reg:
        yield reg


_REGISTRY_FIXTURES = {"local": "local_registry", "servers": "server_registry", "postgres": "postgres_registry",
                      "pg-servers": "pg_server_registry"}


@pytest.fixture(params=["local", *(pytest.param(p, marks=pytest.mark.servers) for p in _REGISTRY_ON_SERVERS)])
def registry(request: pytest.FixtureRequest) -> Registry:
    return request.getfixturevalue(_REGISTRY_FIXTURES[request.param])


@pytest.fixture
def local_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, mlflow_db_template: Path) -> dict[str, str]:
    home = tmp_path / "prefixfleet-home"
    home.mkdir()
    (home / "mlflow.db").write_bytes(mlflow_db_template.read_bytes())
    for name in ("MLFLOW_TRACKING_URI", "PREFIXFLEET_STORE", "AWS_ENDPOINT_URL", "PREFIXFLEET_MODEL_PREFIX"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PREFIXFLEET_HOME", str(home))
    return {"PREFIXFLEET_HOME": str(home)}


@pytest.fixture
def server_env(monkeypatch: pytest.MonkeyPatch, mlflow_server_uri: str, s3_endpoint: str,
               s3_bucket: str) -> dict[str, str]:
    prefix = servers.unique_prefix()
    env = {"MLFLOW_TRACKING_URI": mlflow_server_uri, "PREFIXFLEET_STORE": f"s3://{s3_bucket}/{prefix}",
           "AWS_ENDPOINT_URL": s3_endpoint, "PREFIXFLEET_MODEL_PREFIX": prefix}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


@pytest.fixture(scope="session")
def local_ray() -> Iterator[None]:
    """Ray on this machine with 2 CPUs for the whole session, shut down at its end. Every test that
    runs Ray (directly or through a job or a CLI command in this process) asks for this fixture."""
    import ray

    from prefixfleet.pipelines.cluster import LOCAL_OBJECT_STORE_BYTES

    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=LOCAL_OBJECT_STORE_BYTES,
                 logging_level=logging.WARNING)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_backbones(tmp_path_factory: pytest.TempPathFactory) -> TinyBackbones:
    from tests.fixtures.backbones import TinyBackbones  # here: registry-only runs need no torch

    return TinyBackbones(tmp_path_factory.mktemp("backbones"))
