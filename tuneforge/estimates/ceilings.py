"""An administrator's ceiling on what one job may plan: optimizer steps (`TUNEFORGE_MAX_JOB_STEPS`)
and estimated hours (`TUNEFORGE_MAX_JOB_HOURS`, when the job's estimate has a time).

Checked when a job is created (the API answers 400 naming the field that sets the size) and again
by the worker before it runs a job, so a job created before the ceiling was lowered, or resumed
after, does not run past it either. Pure Python: no database, no HTTP, no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneforge.config import Settings
from tuneforge.estimates.schema import EstimateError, FileStats
from tuneforge.models.spec import JobSpec
from tuneforge.training import hyperparams as training_hp


class OverCeiling(EstimateError):
    """The job plans more steps or hours than this service allows."""

    code = "job_over_ceiling"


@dataclass(frozen=True)
class Plan:
    """How big a job is, and which field of its spec sets that size."""

    steps: int | None
    seconds: float | None
    param: str


def planned(spec: JobSpec, stats: FileStats | None, estimate: dict[str, Any] | None) -> Plan:
    """Steps and seconds a job plans: `max_steps` when given, else epochs times the steps of one
    epoch (from the estimate, or from the file's example count with the recipe's own "auto"
    rules); seconds only from an estimate that has them."""
    hp = spec.hyperparameters
    section = f"method.{spec.method.type}.hyperparameters"
    seconds = estimate.get("estimated_seconds") if estimate else None
    seconds = float(seconds) if isinstance(seconds, int | float) else None
    if hp.max_steps is not None:
        return Plan(hp.max_steps, seconds, f"{section}.max_steps")
    steps = estimate.get("steps") if estimate else None
    if not isinstance(steps, int):
        steps = None
        examples = stats.examples if stats is not None else None
        if examples:
            epochs = hp.n_epochs if isinstance(hp.n_epochs, int) else training_hp.auto_epochs(examples)
            batch = hp.batch_size if isinstance(hp.batch_size, int) else training_hp.auto_batch_size(examples)
            steps = epochs * training_hp.steps_per_epoch(examples, batch, hp.gradient_accumulation_steps)
    return Plan(steps, seconds, f"{section}.n_epochs")


def training_file_stats(path: str | Path) -> FileStats:
    """What the worker knows of a downloaded training file: its examples, one a non-blank line."""
    with open(path, "rb") as handle:
        return FileStats(examples=sum(1 for line in handle if line.strip()))


def check_ceilings(
    spec: JobSpec, stats: FileStats | None, estimate: dict[str, Any] | None, settings: Settings
) -> None:
    """Raises `OverCeiling` (param: the field that sets the job's size) when the job plans more
    steps than `max_job_steps` or its estimate says more hours than `max_job_hours`."""
    plan = planned(spec, stats, estimate)
    if settings.max_job_steps and plan.steps is not None and plan.steps > settings.max_job_steps:
        raise OverCeiling(
            f"This job plans {plan.steps:,} optimizer steps; this service runs at most "
            f"{settings.max_job_steps:,} per job. Lower {plan.param.rsplit('.', 1)[-1]}.",
            plan.param,
        )
    limit = settings.max_job_hours * 3600
    if limit and plan.seconds is not None and plan.seconds > limit:
        raise OverCeiling(
            f"This job's estimate is {plan.seconds / 3600:,.1f} hours; this service runs at most "
            f"{settings.max_job_hours:g} hours per job. Lower {plan.param.rsplit('.', 1)[-1]}.",
            plan.param,
        )
