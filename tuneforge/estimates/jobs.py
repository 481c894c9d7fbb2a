"""The estimate a job is created with: stored on the job (the `estimate` column), and the check
that refuses a job which fits no configured worker class (`TUNEFORGE_WORKER_CLASSES`, e.g.
`gpu=80,small=24`: device memory per worker queue in GiB; `TUNEFORGE_REFUSE_UNFIT_JOBS=false`
keeps the estimate and turns the refusal off)."""

from __future__ import annotations

import logging
from typing import Any

from tuneforge.config import Settings
from tuneforge.estimates.calculator import estimate
from tuneforge.estimates.hardware import GIB, usable_bytes
from tuneforge.estimates.schema import EstimateError, EstimateHyperparameters, EstimateRequest, FileStats
from tuneforge.models.spec import Hyperparameters, JobSpec
from tuneforge.training.loading import CHECKPOINTING_MIN_PARAMS

log = logging.getLogger(__name__)


class JobDoesNotFit(EstimateError):
    """The job's estimated memory exceeds every worker class it could run on."""


def parse_worker_classes(value: str) -> dict[str, float]:
    """`gpu=80,small=24` -> {"gpu": 80.0, "small": 24.0} (GiB of device memory per queue)."""
    classes: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in value.split(","))):
        name, sep, memory = item.partition("=")
        try:
            gib = float(memory)
        except ValueError:
            gib = -1.0
        if not sep or not name.strip() or gib <= 0:
            raise ValueError(f"TUNEFORGE_WORKER_CLASSES entry {item!r} is not of the form queue=GiB")
        classes[name.strip()] = gib
    return classes


def _request(spec: JobSpec, hardware: dict[str, Any] | None, checkpointing: bool = False) -> EstimateRequest:
    """The job's hyperparameters as the calculator reads them: the sampling knobs of a reinforcement
    job too, but not a preference method's beta (no memory of its own)."""
    fields = EstimateHyperparameters.model_fields if spec.method.type == "reinforcement" else None
    hp = EstimateHyperparameters.model_validate(
        spec.hyperparameters.model_dump(include=set(fields or Hyperparameters.model_fields))
    )
    return EstimateRequest(
        model=spec.model,
        adapter=spec.adapter,
        method=spec.method.type,
        hyperparameters=hp,
        hardware=hardware,
        gradient_checkpointing=checkpointing,
    )


def job_estimate(spec: JobSpec, stats: FileStats, settings: Settings) -> dict[str, Any] | None:
    """The estimate to store on a new job (JSON), or None when the model cannot be estimated here
    (the job goes ahead: the calculator is advice, not a gate, except for the two refusals below).

    Raises `EstimateError` for target modules that match nothing in the model (the run would fail
    the same way later) and `JobDoesNotFit` when worker classes are configured, refusal is on, and
    the job fits none it could run on: the class of its queue when that is configured, else any.
    """
    classes = parse_worker_classes(settings.worker_classes)
    queue = spec.queue or settings.default_queue
    target = queue if queue in classes else max(classes, key=lambda name: classes[name], default=None)
    hardware: dict[str, Any] | None = (
        {"gpu": target, "gpu_memory_gb": classes[target]} if target is not None else None
    )
    if hardware is not None and spec.hardware is not None:  # per-device memory of a multi-device run
        hardware |= {"count": spec.hardware.count, "strategy": spec.hardware.strategy}
    try:
        result = estimate(_request(spec, hardware), file_stats=stats, settings=settings)
        if target != "cpu" and result.total_params >= CHECKPOINTING_MIN_PARAMS:
            # the recipe turns gradient checkpointing on for big models on CUDA; estimate what it runs
            result = estimate(_request(spec, hardware, True), file_stats=stats, settings=settings)
    except EstimateError as exc:
        if exc.param == "adapter.target_modules":
            raise
        log.warning("no estimate for job on %s: %s", spec.model, exc.message)
        return None
    except Exception:  # advice must never break job creation
        log.exception("estimate failed for a job on %s", spec.model)
        return None
    body = result.model_dump(mode="json")
    if not classes:
        return body
    total = result.memory.total
    fits = {name: total <= usable_bytes(int(gib * GIB), name != "cpu") for name, gib in classes.items()}
    body["worker_classes"] = fits
    candidates = [queue] if queue in classes else list(classes)
    if settings.refuse_unfit_jobs and not any(fits[name] for name in candidates):
        others = [name for name, ok in fits.items() if ok]
        advice = "; ".join(result.recommendation.fit_advice) or "no change to this job fits"
        where = f"queue '{queue}' ({classes[queue]:g} GiB)" if queue in classes else "any worker class"
        hint = f" It would fit queue {', '.join(repr(o) for o in others)}." if others else ""
        raise JobDoesNotFit(
            f"This job needs about {total / GIB:,.1f} GiB per device, more than {where} offers.{hint} "
            f"Changes that fit: {advice}.",
            "queue" if spec.queue else "adapter",
        )
    return body
