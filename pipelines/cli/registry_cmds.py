"""Registry commands: `get`, `history`, `promote`, `rollback`, `fsck`."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from prefixfleet.pipelines.cli.app import app
from prefixfleet.pipelines.cli.common import HomeOption, JsonOption, NamespaceOption, emit, fail, registry_session, user_key
from prefixfleet.registry import maintenance

UserArgument = Annotated[str, typer.Argument(help="The user (or task) id.")]


@app.command()
def get(
    user: UserArgument,
    namespace: NamespaceOption = "default",
    alias: Annotated[str, typer.Option(help="Which version: an alias.")] = "production",
    version: Annotated[int | None, typer.Option(help="Which version: a number (overrides --alias).")] = None,
    out: Annotated[Path | None, typer.Option("--out", help="Write the verified artifact bytes here.")] = None,
    home: HomeOption = None,
    as_json: JsonOption = False,
) -> None:
    """Resolve a user's prefix; with --out, write its verified bytes."""
    key = user_key(namespace, user)
    with registry_session(home) as registry:
        ref = registry.resolve(key, alias, version=version)
        payload = ref.to_json()
        if out is not None:
            out.write_bytes(registry.fetch_ref(ref))
            payload["out"] = str(out)
    text = f"{namespace}/{user} version {ref.version} ({', '.join(ref.aliases) or 'no alias'}) sha256 {ref.sha256}"
    emit(payload, as_json, text + (f" -> {out}" if out else ""))


@app.command()
def history(user: UserArgument, namespace: NamespaceOption = "default", home: HomeOption = None,
            as_json: JsonOption = False) -> None:
    """Every version of a user's prefix, newest first."""
    key = user_key(namespace, user)
    with registry_session(home) as registry:
        refs = registry.history(key)
    lines = [f"v{r.version}\t{','.join(r.aliases) or '-'}\t{r.created_at}\t{r.sha256[:12]}\t"
             + " ".join(f"{k}={v:.4g}" for k, v in sorted(r.metrics.items())) for r in refs]
    emit({"namespace": namespace, "user_id": user, "versions": [r.to_json() for r in refs]}, as_json, "\n".join(lines))


@app.command()
def promote(
    user: UserArgument,
    version: Annotated[int, typer.Argument(help="The version to promote.")],
    namespace: NamespaceOption = "default",
    alias: Annotated[str, typer.Option(help="The alias to move.")] = "production",
    home: HomeOption = None,
    as_json: JsonOption = False,
) -> None:
    """Point an alias (default production) at a version."""
    key = user_key(namespace, user)
    with registry_session(home) as registry:
        ref = registry.promote(key, version, alias)
    emit(ref.to_json(), as_json, f"{namespace}/{user}: {alias} -> version {ref.version}")


@app.command()
def rollback(user: UserArgument, namespace: NamespaceOption = "default", home: HomeOption = None,
             as_json: JsonOption = False) -> None:
    """Move production back to the previous production version."""
    key = user_key(namespace, user)
    with registry_session(home) as registry:
        ref = registry.rollback(key)
    emit(ref.to_json(), as_json, f"{namespace}/{user}: production -> version {ref.version}")


GraceOpt = Annotated[float, typer.Option(
    "--grace", help="Seconds an unreferenced artifact is left alone: a publish may still be creating its version.")]


@app.command()
def fsck(
    repair: Annotated[bool, typer.Option("--repair", help="Fix what can be fixed.")] = False,
    grace: GraceOpt = maintenance.GRACE_S,
    home: HomeOption = None,
    as_json: JsonOption = False,
) -> None:
    """Find (and with --repair fix) orphans, missing artifacts, hash mismatches and dangling aliases.
    Exits 1 while faults remain."""
    if grace < 0:
        fail(f"--grace must be >= 0 seconds, got {grace}", code=2)
    with registry_session(home) as registry:
        report = maintenance.fsck(registry, repair=repair, grace_s=grace)
    lines = [f"{f.kind}\t{f.location}\t{f.detail}" + ("\t(repaired)" if f.repaired else "") for f in report.faults]
    summary = (f"{report.users} users, {report.versions} versions, {report.objects} artifacts, "
               f"{len(report.faults)} faults, {len(report.in_flight)} left alone as publishes in flight")
    emit(report.to_json(), as_json, "\n".join([*lines, summary]))
    if not report.clean:
        fail(f"{sum(not f.repaired for f in report.faults)} faults remain; run with --repair to fix them")
