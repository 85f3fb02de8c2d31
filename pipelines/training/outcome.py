"""What happened to one user in a job: trained, skipped or failed, with its losses and gate."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from prefixfleet.registry import Unavailable, UserKey
from prefixfleet.registry.errors import RegistryError
from prefixfleet.workers.errors import WorkerError

STATUSES = ("trained", "skipped", "failed")
NOT_STARTED = "not started: "


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
        return cls.failed(key, reason_of(exc), unavailable=isinstance(exc, Unavailable))

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


def reason_of(exc: Exception) -> str:
    """Our own errors read as they are; anything else also names its type."""
    return str(exc) if isinstance(exc, (RegistryError, WorkerError)) else f"{type(exc).__name__}: {exc}"
