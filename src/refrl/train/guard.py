"""The guard: rules on the validation metrics that flag or stop a run, and the best-checkpoint criterion.

RL over-optimises its rewards: past some point a run trades the rewards it does not train
(style, background) or image quality (the dot grid, `refrl.eval.artifacts`) for the ones it
does (docs/guides/validation.md). The guard watches the validation lines of a run
(`refrl.train.validation`) with three kinds of rule:

* ``drop``: a metric falls more than ``drop`` below its value at the first validation
  (for a gold metric the run does not train);
* ``above``: a metric rises above ``above`` (for an artefact metric such as ``patch_grid``);
* ``rise``: a metric rises more than ``rise`` above its value at the first validation;
* ``patience``: a metric (usually ``trained_mean``) has not improved by more than
  ``min_delta`` on its best for ``patience`` validations.

Each rule either flags (a warning and a field of the validation line) or stops the run.
Every rule is a pure function of the history of validation values, so a resumed run,
which reads that history back from ``metrics.jsonl``, decides exactly as an uninterrupted one.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from pydantic import Field, model_validator

from refrl.config import StrictModel
from refrl.errors import ConfigError

RULE_KINDS = ("drop", "above", "rise", "patience")
# Rules that judge a checkpoint's quality: a validation where one fires does not pass the
# guard and cannot be the best checkpoint. ``patience`` judges progress, not the checkpoint.
QUALITY_KINDS = ("drop", "above", "rise")


class GuardRule(StrictModel):
    """One rule on one validation metric; give exactly one of ``drop``, ``above``, ``rise``, ``patience``."""

    metric: str = Field(description="a validation metric: a trained reward, a gold metric or trained_mean")
    drop: float | None = Field(None, ge=0, description="fires when the metric is more than this below its first value")
    above: float | None = Field(None, description="fires when the metric is above this")
    rise: float | None = Field(None, ge=0, description="fires when the metric is more than this above its first value")
    patience: int | None = Field(None, ge=1, description="fires when the metric has not improved for this many validations")
    min_delta: float = Field(0.0, ge=0, description="patience: an improvement must exceed this")
    mode: Literal["max", "min"] = Field("max", description="patience: whether higher (max) or lower (min) is better")
    action: Literal["flag", "stop"] = Field("flag", description="flag: a warning and a metrics field; stop: end the run")

    @model_validator(mode="after")
    def _one_kind(self) -> GuardRule:
        given = [k for k in RULE_KINDS if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"a guard rule takes exactly one of {', '.join(RULE_KINDS)}; got "
                             f"{', '.join(given) or 'none'} (metric {self.metric!r})")
        return self

    @property
    def kind(self) -> str:
        return next(k for k in RULE_KINDS if getattr(self, k) is not None)

    def describe(self) -> str:
        """``style drop > 0.02``, ``patch_grid above 0.05``, ``trained_mean patience 3``."""
        value = getattr(self, self.kind)
        return f"{self.metric} {self.kind} {'> ' if self.kind in ('drop', 'rise') else ''}{value:g}"


@dataclass(frozen=True)
class Verdict:
    """A rule that fired at the latest validation, and why."""

    rule: GuardRule
    message: str

    @property
    def stops(self) -> bool:
        return self.rule.action == "stop"


def check_rule_metrics(rules: Sequence[GuardRule], available: Sequence[str], where: str = "validation.guard") -> None:
    """ConfigError naming the first rule metric that validation does not compute, and the ones it does."""
    for rule in rules:
        if rule.metric not in available:
            raise ConfigError(f"{where}: rule metric {rule.metric!r} is not computed by validation; "
                              f"metrics: {', '.join(available)}")


def _finite(values: Sequence[float | None]) -> list[float]:
    return [float(v) for v in values if v is not None and math.isfinite(float(v))]


def rule_fires(rule: GuardRule, history: Sequence[Mapping[str, float | None]]) -> str | None:
    """Whether ``rule`` fires at the last of ``history`` (validation values, oldest first): the reason, or None.

    * drop: ``v_0 - v_now > drop`` (``v_0`` the first finite value); rise: ``v_now - v_0 > rise``;
    * above: ``v_now > above``;
    * patience K (mode max): ``max(v[-K:]) <= max(v[:-K]) + min_delta``, i.e. none of the last K
      validations beat the best before them by more than ``min_delta`` (mode min: mirrored).

    A missing or NaN current value (the metric applied to no sample) never fires.
    """
    if not history:
        return None
    now = history[-1].get(rule.metric)
    if now is None or not math.isfinite(float(now)):
        return None
    now = float(now)
    if rule.drop is not None:
        first = _finite([h.get(rule.metric) for h in history])
        if first and first[0] - now > rule.drop:
            return f"{rule.metric} fell {first[0] - now:.4g} below its first value {first[0]:.4g} (limit {rule.drop:g})"
        return None
    if rule.rise is not None:
        first = _finite([h.get(rule.metric) for h in history])
        if first and now - first[0] > rule.rise:
            return f"{rule.metric} rose {now - first[0]:.4g} above its first value {first[0]:.4g} (limit {rule.rise:g})"
        return None
    if rule.above is not None:
        return f"{rule.metric} = {now:.4g} is above {rule.above:g}" if now > rule.above else None
    k = int(rule.patience or 0)
    values = [h.get(rule.metric) for h in history]
    before, recent = _finite(values[:-k]), _finite(values[-k:])
    if len(values) <= k or not before or not recent:
        return None
    sign = 1.0 if rule.mode == "max" else -1.0
    best_before = max(sign * v for v in before)
    if max(sign * v for v in recent) <= best_before + rule.min_delta:
        return f"{rule.metric} has not improved on {sign * best_before:.4g} for {k} validations"
    return None


def evaluate_rules(rules: Sequence[GuardRule], history: Sequence[Mapping[str, float | None]]) -> list[Verdict]:
    """The rules that fire at the last validation of ``history``."""
    out = []
    for rule in rules:
        reason = rule_fires(rule, history)
        if reason is not None:
            out.append(Verdict(rule, reason))
    return out


def passes(verdicts: Sequence[Verdict]) -> bool:
    """A validation passes the guard when no quality rule (drop, above, rise) fired at it."""
    return not any(v.rule.kind in QUALITY_KINDS for v in verdicts)


# --------------------------------------------------------------------------- best checkpoint


@dataclass(frozen=True)
class Criterion:
    """``keep_best``'s criterion: a metric and whether higher (max) or lower (min) is better."""

    metric: str
    mode: str = "max"

    @classmethod
    def parse(cls, text: str) -> Criterion:
        """``trained_mean`` / ``max:identity`` (higher is better) or ``min:patch_grid`` (lower is better)."""
        mode, sep, metric = text.partition(":")
        if not sep:
            mode, metric = "max", text
        mode, metric = mode.strip(), metric.strip()
        if mode not in ("max", "min") or not metric:
            raise ConfigError(f"validation.keep_best: {text!r} must be METRIC, max:METRIC or min:METRIC")
        return cls(metric, mode)

    def describe(self) -> str:
        return f"{'highest' if self.mode == 'max' else 'lowest'} {self.metric}"

    def better(self, value: float | None, best: float | None) -> bool:
        """Whether ``value`` beats ``best`` (None: no best yet); NaN never does; ties keep the earlier."""
        if value is None or not math.isfinite(value):
            return False
        if best is None:
            return True
        return value > best if self.mode == "max" else value < best
