"""The promotion gate: a candidate goes to production only when it beats the bare backbone and,
if there is one, the current production prefix, both measured on the candidate's eval split."""
from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Verdict:
    promote: bool
    reason: str


def judge(eval_loss: float | None, baseline_eval_loss: float | None,
          production_eval_loss: float | None = None) -> Verdict:
    """Promote iff eval loss < no-prefix loss and < production's loss (when production exists)."""
    if eval_loss is None or baseline_eval_loss is None or not math.isfinite(eval_loss):
        return Verdict(False, "no finite eval loss")
    if not eval_loss < baseline_eval_loss:
        return Verdict(False, f"eval loss {eval_loss:.4f} does not beat the no-prefix baseline "
                              f"{baseline_eval_loss:.4f}")
    if production_eval_loss is None:
        return Verdict(True, f"beats the no-prefix baseline ({eval_loss:.4f} < {baseline_eval_loss:.4f}); "
                             "no production yet")
    if not eval_loss < production_eval_loss:
        return Verdict(False, f"eval loss {eval_loss:.4f} does not beat production's {production_eval_loss:.4f} "
                              "on the same split")
    return Verdict(True, f"beats production ({eval_loss:.4f} < {production_eval_loss:.4f}) "
                         f"and the no-prefix baseline ({baseline_eval_loss:.4f})")
