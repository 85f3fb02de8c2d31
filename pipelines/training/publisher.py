"""A trainer's registry side: what a task starts from, and its version published and gated.

A version reaches the gate in one of two ways, and both take the same step: judged on the
candidate's eval split against the bare backbone and production, promoted when it wins. Fresh
from training (gated first, then published with its aliases in one publish), or published before
(by this job before a crash, or by an earlier job that stopped before its publish had set
production), in which case its gate is finished here instead of training again.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from prefixfleet.pipelines.training.gate import Verdict, judge
from prefixfleet.pipelines.training.outcome import Outcome
from prefixfleet.pipelines.training.plan import JobContext, UserTask
from prefixfleet.registry import Forgotten, NotFound, Registry, UserKey, VersionRef
from prefixfleet.registry.refs import PRODUCTION
from prefixfleet.workers.artifact import ArtifactMeta, deserialize, serialize
from prefixfleet.workers.prefix import PrefixTensors
from prefixfleet.workers.trainer import UserResult

GATED_AGAINST = "gated_against"  # version tag: the production version a candidate was judged against

Measure = Callable[[PrefixTensors], float]  # a prefix's eval loss on the candidate's eval split


@dataclass(frozen=True)
class Production:
    """Production when a candidate was measured, and its loss on the candidate's eval split
    (None: there is no production, or it was trained on another backbone)."""

    ref: VersionRef | None
    loss: float | None = None

    @property
    def label(self) -> str:
        return str(self.ref.version) if self.ref is not None else "none"


class Publisher:
    """Thread-safe: publishes run on the trainer's pool while its next users train."""

    def __init__(self, registry: Registry, fingerprint: str) -> None:
        self.registry, self.fingerprint = registry, fingerprint

    def close(self) -> None:
        self.registry.close()

    def check_not_forgotten(self, key: UserKey, context: JobContext) -> None:
        """Forgotten when the user was forgotten after the job started: it is not trained."""
        if context.erasures is not None and self.registry.forgotten_since(key, context.erasures):
            raise Forgotten(f"{key} was forgotten after this job started")

    def existing(self, task: UserTask) -> VersionRef | None:
        """The version the plan found already trained from this task (by an earlier job, or this
        one before a crash); None when there is none, or it has been deleted since (trained again)."""
        if task.existing is None:
            return None
        try:
            return self.registry.resolve(task.key, version=task.existing, fresh=True)
        except NotFound:
            return None

    def warm_start(self, task: UserTask) -> PrefixTensors | None:
        if task.warm_start is None:
            return None
        return self._tensors(self.registry.resolve(task.key, version=task.warm_start))

    def production(self, key: UserKey, measure: Measure) -> Production:
        """Production as it is now (not a cached resolution), measured when it shares our backbone."""
        ref = self._current(key)
        if ref is None or ref.backbone_fingerprint != self.fingerprint:
            return Production(ref)
        return Production(ref, measure(self._tensors(ref)))

    def publish(self, task: UserTask, result: UserResult, production: Production, context: JobContext) -> Outcome:
        """Gate a trained candidate on its losses, then publish it with them: as `candidate`, and
        as `production` too when the gate passed, in one publish. Promoted means production is on
        it: a newer version a concurrent publish promoted keeps production."""
        if not result.ok:
            return Outcome.failed(task.key, result.error or "training failed")
        meta = ArtifactMeta(task.key.namespace, task.key.user_id, task.spec, self.fingerprint, task.data_fingerprint,
                            backbone=context.backbone, settings=context.config.settings_json(task.spec.method))
        metrics = result.metrics()
        if production.loss is not None:
            metrics["production_eval_loss"] = production.loss
        verdict = judge(result.eval_loss, result.baseline_eval_loss, production.loss)
        ref = self.registry.publish(task.key, serialize(result.tensors, meta), metrics=metrics, run_id=context.run_id,
                                    alias="candidate", promote=verdict.promote, erasures=context.erasures,
                                    tags={"job": context.kind, "reason": task.reason, GATED_AGAINST: production.label},
                                    published=task.published)
        promoted = PRODUCTION in ref.aliases
        reason = verdict.reason if promoted or not verdict.promote else \
            f"{verdict.reason}; a concurrent publish holds production"
        return Outcome(key=task.key, status="trained", version=ref.version, sha256=ref.sha256,
                       eval_loss=result.eval_loss, baseline_eval_loss=result.baseline_eval_loss,
                       production_eval_loss=production.loss, promoted=promoted, reason=reason,
                       loss_curve=result.loss_curve)

    def finish_gate(self, task: UserTask, ref: VersionRef, context: JobContext, measure: Measure) -> Outcome:
        """Judge a version published before against production as it is now: on the losses recorded
        at publish while production is the one it was measured against, else on production
        measured again. A version a rollback took production from is not promoted again."""
        mine = ref.run_id == context.run_id
        eval_loss, baseline = ref.metrics.get("eval_loss"), ref.metrics.get("baseline_eval_loss")
        outcome = Outcome(key=task.key, status="trained" if mine else "skipped", version=ref.version,
                          sha256=ref.sha256, eval_loss=eval_loss, baseline_eval_loss=baseline)
        current = self._current(task.key)
        earlier = f"already published as version {ref.version}"
        if current is not None and current.version == ref.version:
            outcome.promoted, outcome.reason = mine, f"{earlier}, in production"
            return outcome
        if ref.version in self.registry.rolled_back(task.key):
            outcome.reason = f"{earlier}; a rollback took production from it, so it stays down"
            return outcome
        if ref.tags.get(GATED_AGAINST) == Production(current).label:
            production = Production(current, ref.metrics.get("production_eval_loss"))
        else:
            production = self.production(task.key, measure)
        verdict = self._gate(ref, eval_loss, baseline, production.loss)
        outcome.production_eval_loss, outcome.promoted = production.loss, verdict.promote
        outcome.reason = verdict.reason if mine else f"{earlier}; its gate finished now: {verdict.reason}"
        return outcome

    def _gate(self, ref: VersionRef, eval_loss: float | None, baseline: float | None,
              production_loss: float | None) -> Verdict:
        verdict = judge(eval_loss, baseline, production_loss)
        if verdict.promote:
            self.registry.promote(ref.key, ref.version)
        return verdict

    def _current(self, key: UserKey) -> VersionRef | None:
        try:
            return self.registry.resolve(key, "production", fresh=True)
        except NotFound:
            return None

    def _tensors(self, ref: VersionRef) -> PrefixTensors:
        tensors, _ = deserialize(self.registry.fetch_ref(ref), backbone_fingerprint=self.fingerprint)
        return tensors
