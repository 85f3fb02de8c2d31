"""`train`, `retrain` and `demo`: training jobs on Ray, published to the registry. Ray, torch and
the job code are imported when one of these commands runs, not when the CLI starts."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from prefixfleet.pipelines.cli.app import app
from prefixfleet.pipelines.cli.common import HomeOption, JsonOption, NamespaceOption, emit, fail, needs, open_registry
from prefixfleet.pipelines.training.errors import JobError
from prefixfleet.registry import home_dir
from prefixfleet.registry.errors import RegistryError
from prefixfleet.registry.retry import DEADLINE_VAR
from prefixfleet.workers.errors import WorkerError
from prefixfleet.workers.spec import PrefixSpec, TrainConfig

if TYPE_CHECKING:
    from rich.table import Table

    from prefixfleet.pipelines.demo import DemoReport
    from prefixfleet.pipelines.training.job import JobRequest, JobSummary
    from prefixfleet.pipelines.training.outcome import Outcome
    from prefixfleet.registry import Registry

DataArg = Annotated[str, typer.Argument(help="JSONL or Parquet file or folder, local or s3://bucket/key.")]
BackboneOpt = Annotated[str, typer.Option("--backbone", help="HF model id or local save_pretrained folder.")]
MethodOpt = Annotated[str, typer.Option("--method", help="prefix | ptuning-v2 | prompt")]
TokensOpt = Annotated[int, typer.Option("--virtual-tokens", help="Prefix length.")]
InitOpt = Annotated[str, typer.Option(
    "--init", help='random, or text:"..." to start from the frozen model\'s activations of these real tokens.')]
ReparamOpt = Annotated[int | None, typer.Option(
    "--reparam-hidden", help="Width of the reparametrization MLP of --method prefix (default 512).")]
StepsOpt = Annotated[int, typer.Option("--steps", help="Optimizer steps per user.")]
LrOpt = Annotated[float | None, typer.Option("--lr", help="Learning rate (default: per method).")]
BatchOpt = Annotated[int, typer.Option("--batch-size", help="Examples per user per step.")]
PrecisionOpt = Annotated[str, typer.Option(
    "--precision", help="float32 | bfloat16 (bf16 autocast for forward/backward; prefixes stay float32).")]
ModeOpt = Annotated[str, typer.Option(
    "--mode", help="packed: many users share each batch; isolated: one user per call.")]
PackOpt = Annotated[int, typer.Option("--pack-size", help="Users trained together in one batch (packed mode).")]
SkipOpt = Annotated[bool, typer.Option("--skip-bad-rows", help="Report bad rows and train on the rest.")]
AddressOpt = Annotated[str | None, typer.Option(
    "--address", help="Ray cluster address (default: RAY_ADDRESS, else local Ray).")]
ActorsOpt = Annotated[int | None, typer.Option("--actors", help="Trainer actors (default: as many as fit).")]
CpusOpt = Annotated[float, typer.Option("--actor-cpus", help="CPUs per trainer actor.")]
GpusOpt = Annotated[float, typer.Option("--actor-gpus", help="GPUs per trainer actor; fractions share a GPU.")]
PerUserOutOpt = Annotated[Path | None, typer.Option(
    "--per-user-out", help="Write every per-user row as JSONL to this file (--json then may carry counts only).")]
DryRunOpt = Annotated[bool, typer.Option(
    "--dry-run", help="Plan only: print, as it is decided, each user to be trained, skipped or refused; "
                      "nothing is trained or written.")]
OutageOpt = Annotated[float, typer.Option(
    "--outage-deadline", help="Seconds to wait out an unreachable MLflow or S3 before the job stops; "
                              "running it again finishes it.")]
JOB_OUTAGE_DEADLINE_S = 180.0


def _setup_logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    logger = logging.getLogger("prefixfleet")
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False


def _run(request: JobRequest, home: Path | None, outage_deadline: float) -> JobSummary:
    with needs("train"):
        from prefixfleet.pipelines.training.data import DataError
        from prefixfleet.pipelines.training.job import run_job  # noqa: F401 - fails here, named, without the extra

    if not outage_deadline > 0:
        fail(f"--outage-deadline must be a positive number of seconds, got {outage_deadline}", code=2)
    os.environ[DEADLINE_VAR] = str(outage_deadline)  # this process's registry and, forwarded, the actors'
    _setup_logging()
    registry = open_registry(home)
    try:
        summary = _run_on_stderr(request, registry, home_dir(home))
    except DataError as exc:
        for row in exc.bad_rows:
            typer.echo(f"bad row {row}", err=True)
        if exc.bad_count > len(exc.bad_rows):
            typer.echo(f"… and {exc.bad_count - len(exc.bad_rows)} more bad rows", err=True)
        fail(str(exc), code=2)
    except (JobError, RegistryError, WorkerError) as exc:
        fail(str(exc))
    return summary


def _run_on_stderr(request: JobRequest, registry: Registry, home: Path) -> JobSummary:
    """The job with stdout sent to stderr: Ray prints its workers' and raylets' lines to stdout,
    which holds only our report. A Ray this call connected to is left before stdout is given back."""
    import ray

    from prefixfleet.pipelines.training.job import run_job

    connected = ray.is_initialized()
    with contextlib.redirect_stdout(sys.stderr):
        try:
            return run_job(request, registry, home)
        finally:
            if not connected and ray.is_initialized():
                ray.shutdown()


PLAN_WORDS = {"planned": "train", "skipped": "skip", "failed": "refuse"}


def _plan_printer(as_json: bool) -> Callable[[Outcome], None]:
    """A dry run's line per user, printed to stdout (as it is now) as its chunk is planned."""
    out = sys.stdout

    def show(outcome: Outcome) -> None:
        word = PLAN_WORDS[outcome.status]
        if as_json:
            typer.echo(json.dumps({"plan": word, "namespace": outcome.key.namespace, "user_id": outcome.key.user_id,
                                   "version": outcome.version, "reason": outcome.reason}), file=out)
        else:
            typer.echo(f"{word:6} {outcome.key.namespace}/{outcome.key.user_id}: {outcome.reason}", file=out)
    return show


def _report_plan(summary: JobSummary, as_json: bool, skip_bad_rows: bool) -> None:
    refused = ""
    if summary.data.bad_count and not skip_bad_rows:
        refused = (f"the job would refuse to start: {summary.data.bad_count} bad rows "
                   "(fix them or pass --skip-bad-rows)")
    emit({**summary.to_json(), "per_user": [], "dry_run": True}, as_json,
         "\n".join(filter(None, [summary.describe(), refused])))


def _report(summary: JobSummary, as_json: bool, per_user_out: Path | None) -> None:
    lines = [f"job {summary.job_id}"]
    if summary.truncated:
        where = f"every one in {per_user_out}" if per_user_out else "pass --per-user-out FILE for every one"
        lines.append(f"  {summary.listed} users trained, failed or promoted; the first {len(summary.per_user)} "
                     f"shown ({where})")
    for o in summary.per_user:
        if o.status == "failed":
            lines.append(f"  {o.key.namespace}/{o.key.user_id}: failed: {o.reason}")
        else:
            lines.append(f"  {o.key.namespace}/{o.key.user_id}: version {o.version}, eval loss {o.eval_loss:.4f} "
                         f"(no prefix {o.baseline_eval_loss:.4f}), "
                         f"{'promoted' if o.promoted else 'not promoted'}: {o.reason}")
    emit(summary.to_json(), as_json, "\n".join(lines))
    failed = summary.users["failed"]
    if failed:
        fail(f"{failed} of {summary.users['read']} users failed; see per_user for each reason")


def _spec(method: str, virtual_tokens: int, init: str, reparam_hidden: int | None) -> PrefixSpec:
    """The prefix spec the flags name; a bad flag exits with code 2 naming it."""
    if init != "random" and not init.startswith("text:"):
        fail(f'--init must be random or text:"...", got {init!r}', code=2)
    if reparam_hidden is not None and method != "prefix":
        fail(f"--reparam-hidden sizes the MLP of --method prefix; {method} has none", code=2)
    init_text = init[len("text:"):] if init.startswith("text:") else None
    if init_text is not None and not init_text.strip():
        fail('--init text: needs the text after the colon, e.g. --init text:"Dear customer"', code=2)
    extra = {} if reparam_hidden is None else {"reparam_hidden": reparam_hidden}
    try:
        return PrefixSpec(method=method, num_virtual_tokens=virtual_tokens, init_text=init_text, **extra)
    except WorkerError as exc:
        fail(str(exc), code=2)


def _request(kind: str, data: str, backbone: str, namespace: str, spec: PrefixSpec, steps: int,
             lr: float | None, batch_size: int, precision: str, mode: str, pack_size: int, skip_bad_rows: bool,
             address: str | None, actors: int | None, actor_cpus: float, actor_gpus: float,
             per_user_out: Path | None, dry_run: bool, as_json: bool) -> JobRequest:
    with needs("train"):
        from prefixfleet.pipelines.training.job import JobRequest

    try:
        config = TrainConfig(steps=steps, lr=lr, batch_size=batch_size, precision=precision)
    except WorkerError as exc:
        fail(str(exc), code=2)
    if pack_size < 1:
        fail(f"--pack-size must be at least 1, got {pack_size}", code=2)
    return JobRequest(data, backbone, kind, namespace, spec, config, mode, pack_size, skip_bad_rows, address,
                      actors, actor_cpus, actor_gpus, per_user_out=per_user_out, dry_run=dry_run,
                      on_outcome=_plan_printer(as_json) if dry_run else None)


def _finish(request: JobRequest, home: Path | None, outage_deadline: float, as_json: bool) -> None:
    summary = _run(request, home, outage_deadline)
    if request.dry_run:
        _report_plan(summary, as_json, request.skip_bad_rows)
    else:
        _report(summary, as_json, request.per_user_out)


@app.command()
def train(
    data: DataArg, backbone: BackboneOpt, namespace: NamespaceOption = "default", method: MethodOpt = "prefix",
    virtual_tokens: TokensOpt = 8, init: InitOpt = "random", reparam_hidden: ReparamOpt = None,
    steps: StepsOpt = 60, lr: LrOpt = None, batch_size: BatchOpt = 8,
    precision: PrecisionOpt = "float32", mode: ModeOpt = "packed", pack_size: PackOpt = 8,
    skip_bad_rows: SkipOpt = False, address: AddressOpt = None, actors: ActorsOpt = None,
    actor_cpus: CpusOpt = 1.0, actor_gpus: GpusOpt = 0.0,
    outage_deadline: OutageOpt = JOB_OUTAGE_DEADLINE_S, per_user_out: PerUserOutOpt = None, dry_run: DryRunOpt = False,
    home: HomeOption = None, as_json: JsonOption = False,
) -> None:
    """Train every user in DATA, publish each as `candidate`, promote to `production` when the gate passes."""
    spec = _spec(method, virtual_tokens, init, reparam_hidden)
    request = _request("train", data, backbone, namespace, spec, steps, lr, batch_size, precision,
                       mode, pack_size, skip_bad_rows, address, actors, actor_cpus, actor_gpus, per_user_out, dry_run,
                       as_json)
    _finish(request, home, outage_deadline, as_json)


@app.command()
def retrain(
    data: DataArg, backbone: BackboneOpt, namespace: NamespaceOption = "default", method: MethodOpt = "prefix",
    virtual_tokens: TokensOpt = 8, init: InitOpt = "random", reparam_hidden: ReparamOpt = None,
    steps: StepsOpt = 60, lr: LrOpt = None, batch_size: BatchOpt = 8,
    precision: PrecisionOpt = "float32", mode: ModeOpt = "packed", pack_size: PackOpt = 8,
    skip_bad_rows: SkipOpt = False, address: AddressOpt = None, actors: ActorsOpt = None,
    actor_cpus: CpusOpt = 1.0, actor_gpus: GpusOpt = 0.0,
    outage_deadline: OutageOpt = JOB_OUTAGE_DEADLINE_S, per_user_out: PerUserOutOpt = None, dry_run: DryRunOpt = False,
    home: HomeOption = None, as_json: JsonOption = False,
) -> None:
    """Retrain only users whose data changed since their production prefix (warm start, same gate).

    Users without a production prefix are trained from scratch with --method, --virtual-tokens,
    --init and --reparam-hidden.
    """
    spec = _spec(method, virtual_tokens, init, reparam_hidden)
    request = _request("retrain", data, backbone, namespace, spec, steps, lr, batch_size, precision,
                       mode, pack_size, skip_bad_rows, address, actors, actor_cpus, actor_gpus, per_user_out, dry_run,
                       as_json)
    _finish(request, home, outage_deadline, as_json)


def _demo_tables(report: DemoReport) -> tuple[Table, Table]:
    from rich.table import Table

    def marked(text: str, styled: bool) -> str:
        return f"[green]✓[/green] {text}" if styled else f"[red]✗[/red] {text}"

    losses = Table(title="eval loss on each user's held-out examples (lower is better)")
    for column in ("user", "style", "no prefix", "own prefix", "another user's prefix", "whose"):
        losses.add_column(column, justify="right" if "prefix" in column else "left")
    texts = Table(title="generated from the held-out prompt (✓: the user's own greeting and sign-off)")
    for column in ("user", "prompt", "own prefix", "no prefix", "another user's prefix"):
        texts.add_column(column)
    for r in report.rows:
        mark = "[green]" if r.own_lowest else "[red]"
        losses.add_row(r.user_id, r.style, f"{r.loss_no_prefix:.3f}", f"{mark}{r.loss_own_prefix:.3f}",
                       f"{r.loss_other_prefix:.3f}", r.other_user)
        texts.add_row(r.user_id, r.prompt, marked(r.generated, r.styled),
                      marked(r.generated_no_prefix, r.styled_no_prefix),
                      marked(r.generated_other_prefix, r.styled_other_prefix))
    return losses, texts


def _shares_line(report: DemoReport) -> str:
    shares, count = report.shares, len(report.rows)
    share = {key: f"{round(value * count)}/{count} ({value:.0%})" for key, value in shares.items()}
    return (f"own greeting and sign-off in the generation: with the own prefix {share['own']}, "
            f"with no prefix {share['none']}, with another user's prefix {share['other']}")


@app.command()
def demo(
    users: Annotated[int, typer.Option("--users", help="Synthetic users (at least 10).")] = 50,
    home: HomeOption = None,
    as_json: JsonOption = False,
) -> None:
    """End to end on embedded defaults: a small pretrained backbone, synthetic users, Ray training,
    registry, generation that shows each user's style."""
    from rich.console import Console

    with needs("train"):
        from prefixfleet.pipelines.demo import CONTROL_LIMIT, MARGIN, MIN_USERS, STYLE_GOAL, run_demo

    if users < MIN_USERS:
        fail(f"--users must be at least {MIN_USERS}, got {users}", code=2)
    _setup_logging()
    registry = open_registry(home)
    try:
        report = run_demo(users, home_dir(home), registry)
    except (JobError, RegistryError, WorkerError) as exc:
        fail(str(exc))
    if as_json:
        emit(report.to_json(), True, "")
    else:
        for table in _demo_tables(report):
            Console().print(table)
        typer.echo(_shares_line(report))
    if not report.own_lowest:
        fail(f"own-prefix loss is not clearly the lowest (below {MARGIN:.0%} of the others) for every user shown")
    if not report.styled:
        fail(f"the style check failed: at least {STYLE_GOAL:.0%} with the own prefix and at most "
             f"{CONTROL_LIMIT:.0%} otherwise are needed; {_shares_line(report)}")
    if not as_json:
        typer.echo("own prefix is clearly the lowest for every user shown, and its generations carry the user's "
                   "style: personalized, not contaminated")
