"""The promotion gate: beat the no-prefix baseline and, when there is one, production."""
from __future__ import annotations

import math

from prefixfleet.pipelines.training.gate import judge


def test_first_prefix_needs_only_to_beat_the_baseline() -> None:
    assert judge(2.0, 5.0).promote
    verdict = judge(5.0, 5.0)
    assert not verdict.promote and "baseline" in verdict.reason


def test_challenger_must_beat_production_on_the_same_split() -> None:
    assert judge(2.0, 5.0, 2.5).promote
    verdict = judge(2.6, 5.0, 2.5)
    assert not verdict.promote and "production" in verdict.reason


def test_missing_or_non_finite_losses_never_promote() -> None:
    assert not judge(None, 5.0).promote
    assert not judge(math.nan, 5.0).promote
    assert not judge(math.inf, 5.0, 4.0).promote
