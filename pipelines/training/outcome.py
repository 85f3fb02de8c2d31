"""What happened to one user in a job: trained, skipped or failed, with its losses and gate."""
from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from typing import Any

from prefixfleet.pipelines.training.plan import Failure, Skip, UserTask
from prefixfleet.registry import Forgotten, Unavailable, UserKey
from prefixfleet.registry.errors import RegistryError
from prefixfleet.workers.errors import WorkerError

STATUSES = ("trained", "skipped", "failed", "planned")  # planned: a dry run would train the user
NOT_STARTED = "not started: "
FORGOTTEN = "forgotten after this job started: nothing of the user was published"


@dataclass(kw_only=True)
class Outcome:
    key: UserKey
    status: str  # one of STATUSES
    version: int | None = None
    sha256: str | None = None
    eval_loss: float | None = None
    baseline_eval_loss: float | None = None
    production_eval_loss: float | None = None
    promoted: bool = False
    reason: str = ""
    unavailable: bool = False  # failed because a server stayed unreachable: a re-run finishes it
    loss_curve: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.status not in STATUSES:
            raise ValueError(f"unknown outcome status {self.status!r}")

    @classmethod
    def failed(cls, key: UserKey, reason: str, *, unavailable: bool = False) -> Outcome:
        return cls(key=key, status="failed", reason=reason, unavailable=unavailable)

    @classmethod
    def from_error(cls, key: UserKey, exc: Exception) -> Outcome:
        if isinstance(exc, Forgotten):  # the job did what it must; only a later job may train the user
            return cls(key=key, status="skipped", reason=FORGOTTEN)
        return cls.failed(key, reason_of(exc), unavailable=isinstance(exc, Unavailable))

    @classmethod
    def planned(cls, decision: UserTask | Skip | Failure) -> Outcome:
        """What the plan decided, before any training: a task is `planned` (a dry run's)."""
        if isinstance(decision, UserTask):
            version = decision.existing if decision.existing is not None else decision.warm_start
            return cls(key=decision.key, status="planned", version=version, reason=decision.reason)
        if isinstance(decision, Skip):
            return cls(key=decision.key, status="skipped", version=decision.version, reason=decision.reason)
        return cls.failed(decision.key, decision.reason)

    @classmethod
    def not_started(cls, key: UserKey, why: str) -> Outcome:
        """Not tried: `why`, a server unreachable past the outage deadline, stopped the job first."""
        return cls.failed(key, f"{NOT_STARTED}{why}", unavailable=True)

    @property
    def unavailable_reason(self) -> str:
        """Why a server-stopped user failed, without the "not started: " of those never tried."""
        return self.reason.removeprefix(NOT_STARTED)

    def to_json(self) -> dict[str, Any]:
        out = {"namespace": self.key.namespace, "user_id": self.key.user_id, **asdict(self)}
        del out["key"], out["loss_curve"]
        return out

    def to_record(self, pseudonym: str) -> dict[str, Any]:
        """The row a job run stores: the user named by `pseudonym`, so a forget leaves none to erase."""
        out = {"namespace": self.key.namespace, "user": pseudonym, **self.to_json()}
        del out["user_id"]
        out["reason"] = scrub(self.reason, self.key, pseudonym)
        return out


def scrub(text: str, key: UserKey, alias: str) -> str:
    """`text` with the user's id in each spelling our messages use (as is, inside repr quotes,
    escaped in model names and object keys) replaced by `alias`."""
    spellings = sorted({key.user_id, repr(key.user_id)[1:-1], key.escaped_user}, key=len, reverse=True)
    return re.sub(rf"(?<![\w~-])(?:{'|'.join(map(re.escape, spellings))})(?![\w~-])", alias, text)


def reason_of(exc: Exception) -> str:
    """Our own errors read as they are; anything else also names its type."""
    return str(exc) if isinstance(exc, (RegistryError, WorkerError)) else f"{type(exc).__name__}: {exc}"
