"""Creating fine-tuning jobs: the checks that need the database and the settings, on top of the
body validation that `JobSpec` does.

`create_job` is the one place a job is born: it starts in `validating_files`, with its cost
estimate in the `estimate` column, and a worker is asked to check its files.
"""

from __future__ import annotations

import logging
import secrets
from typing import Any

from sqlalchemy.orm import Session

from tuneforge.api import quotas
from tuneforge.api.errors import BadRequest
from tuneforge.api.services.exports import check_exports
from tuneforge.api.services.integrations import check_integrations
from tuneforge.config import Settings
from tuneforge.db import after_commit, utcnow
from tuneforge.estimates import EstimateError, FileStats
from tuneforge.estimates.ceilings import OverCeiling, check_ceilings
from tuneforge.estimates.jobs import JobDoesNotFit, job_estimate
from tuneforge.graders import GraderError, GraderRuntime, ensure_runnable, parse_grader
from tuneforge.graders.references import item_references
from tuneforge.models import file as files
from tuneforge.models import job as jobs
from tuneforge.models import lineage
from tuneforge.models.spec import PROMPT_LEARNING_ADAPTERS, JobSpec
from tuneforge.training.base_models import UnknownModel, find_base_model
from tuneforge.training.formats import (
    KTO_FORMATS,
    LABEL_MISSING,
    LABEL_NOT_BOOLEAN,
    METHOD_FORMATS,
    DataFormat,
    FieldStats,
    plain_format,
)
from tuneforge.worker.dispatch import UnknownQueue, check_queue

log = logging.getLogger(__name__)


def _enqueue_after_commit(session: Session, job_id: str, queue: str) -> None:
    """Sends the job to the workers once the commit has made it visible. A failed send is logged,
    not raised: the job is committed and the worker's reconciler sends stale queued jobs again."""

    def send() -> None:
        from tuneforge.worker.dispatch import enqueue_job

        try:
            enqueue_job(job_id, queue)
        except Exception:
            log.exception("could not enqueue job %s on queue %s; the reconciler will retry", job_id, queue)

    after_commit(session, send)


def _checked_file(session: Session, project_id: str, file_id: str, param: str, spec: JobSpec) -> files.File:
    """The file row, when it is in the project, of purpose fine-tune, in a format the job's method
    reads and (as far as its recorded `field_stats` tell) with every line holding the fields the
    method needs; a 400 naming the first line that lacks one otherwise."""
    label = "Training" if param == "training_file" else "Validation"
    method = spec.method.type
    row = files.get_file(session, project_id, file_id)
    if row is None:
        raise BadRequest(f"{label} file {file_id} not found.", param=param, code="file_not_found")
    if row.purpose != files.PURPOSE_FINE_TUNE:
        raise BadRequest(
            f"{label} file {file_id} has purpose '{row.purpose}'; upload it with purpose 'fine-tune'.",
            param=param,
            code="invalid_file_purpose",
        )
    fields = FieldStats.from_dict(row.field_stats) if row.field_stats else None
    first_line = (fields.first_line if fields else None) or 1
    fmt = _format_for(row.format, method)
    if method == "reinforcement" and fmt == DataFormat.CHAT:
        raise BadRequest(
            f"{label} file {file_id}: line {first_line} is not a reinforcement prompt (its last message "
            "is not the user's, or it holds an assistant answer); reinforcement trains on chat lines of "
            "system and user messages ending with the user's, whose other fields are the grader's item.",
            param=param,
            code="invalid_file_format",
        )
    if method == "kto" and fmt in KTO_FORMATS.values() and fields is not None:
        _check_labels(fields, f"{label} file {file_id}", param)
    accepted = sorted(f.value for f in METHOD_FORMATS[method])
    if fmt not in accepted:
        raise BadRequest(
            f"{label} file {file_id} is in {fmt or 'no known'} format, which the {method} method "
            f"cannot use; it accepts {', '.join(accepted)}.",
            param=param,
            code="invalid_file_format",
        )
    if method == "reinforcement" and spec.method.reinforcement is not None and fields is not None:
        _check_item_fields(fields, spec.method.reinforcement.grader, f"{label.lower()} file {file_id}")
    return row


def _format_for(stored: str | None, method: str) -> str | None:
    """A file's format as `method` reads it: `label` is an extra key for every method but kto."""
    try:
        return plain_format(DataFormat(stored)).value if stored and method != "kto" else stored
    except ValueError:
        return stored


def _check_labels(fields: FieldStats, what: str, param: str) -> None:
    """A kto job's file whose lines are chat or prompt/completion lines: the first line without a
    boolean `label` is named."""
    missing = fields.first_line_lacking("label") or None
    lines = [
        (line, reason)
        for line, reason in ((missing, LABEL_MISSING), (fields.label_not_boolean, LABEL_NOT_BOOLEAN))
        if line
    ]
    if lines:
        line, reason = min(lines)
        raise BadRequest(f"{what}: line {line}: {reason}.", param=param, code="invalid_file_format")


def _check_item_fields(fields: FieldStats, grader: dict[str, Any], what: str) -> None:
    """Every field the grader reads from the item is in every line (a nested path's first key:
    what lies below it is checked by the worker's read of the file)."""
    for reference in item_references(grader):
        line = fields.first_line_lacking(reference.key) if reference.key != "messages" else fields.first_line
        if line:
            raise BadRequest(
                f"The grader reads {reference.text}, but line {line} of {what} has no field "
                f"'{reference.key}'; every line of a reinforcement file needs the item fields its grader "
                "reads (the fields beside messages).",
                param=f"method.reinforcement.grader.{reference.param}".rstrip("."),
                code="invalid_file_format",
            )


def _check_runnable(grader: dict[str, Any], param: str, settings: Settings) -> None:
    """A grader (valid: the spec checked it) that this service cannot run is a 400 naming the
    field, before the job is queued: a python grader while they are off, a model grader with no
    grader model endpoint, a metric the service lacks."""
    try:
        ensure_runnable(parse_grader(grader, param), GraderRuntime.from_settings(settings), param)
    except GraderError as exc:
        raise BadRequest(exc.message, param=exc.param, code="grader_unavailable") from None


def create_job(session: Session, settings: Settings, project_id: str, spec: JobSpec) -> jobs.Job:
    """Checks what the body alone cannot tell (model on offer, files in the project and in a
    format the method accepts), writes the job in validating_files with its first events and
    sends it to the workers after the commit: a worker runs the deep checks (token lengths with
    the real tokenizer, fit with the method), then queues and runs it, or fails it with
    `invalid_training_file`."""
    given_model = spec.model
    source, spec = _continued_spec(session, project_id, spec)
    try:
        find_base_model(spec.model, settings.models, settings.models_dir)
    except UnknownModel:
        raise BadRequest(
            f"Model '{given_model}' is not on offer here; GET /v1/models lists the models you can fine-tune.",
            param="model",
            code="model_not_available",
        ) from None
    method = spec.method.type
    if method == "reinforcement" and spec.adapter.type in PROMPT_LEARNING_ADAPTERS:
        raise BadRequest(
            f"method reinforcement cannot train a {spec.adapter.type} adapter: TRL's GRPO samples answers "
            "with PEFT's generate, which misplaces virtual tokens under transformers 5, so the sampled "
            "answers and their rewards would not be the adapter's; use lora, qlora, dora, ia3 or full.",
            param="adapter.type",
            code="invalid_adapter",
        )
    training = _checked_file(session, project_id, spec.training_file, "training_file", spec)
    if spec.validation_file is not None:
        _checked_file(session, project_id, spec.validation_file, "validation_file", spec)
    if spec.method.reinforcement is not None:
        _check_runnable(spec.method.reinforcement.grader, "method.reinforcement.grader", settings)
    if spec.evaluation is not None:
        _check_runnable(spec.evaluation.grader, "evaluation.grader", settings)

    check_integrations(spec, settings)
    check_exports(spec)
    seed = spec.seed if spec.seed is not None else secrets.randbelow(2**31)
    spec = spec.model_copy(update={"seed": seed})
    try:
        queue = check_queue(spec.queue, settings)
    except UnknownQueue as exc:
        raise BadRequest(str(exc), param="queue", code="invalid_queue") from None
    try:
        stats = FileStats(
            examples=training.examples, approx_tokens=training.approx_tokens, format=training.format
        )
        estimate = job_estimate(spec, stats, settings)
        check_ceilings(spec, stats, estimate, settings)
    except OverCeiling as exc:
        raise BadRequest(exc.message, param=exc.param, code=exc.code) from None
    except EstimateError as exc:
        code = "job_does_not_fit" if isinstance(exc, JobDoesNotFit) else "invalid_adapter"
        raise BadRequest(exc.message, param=exc.param, code=code) from None
    now = utcnow()
    job = jobs.Job(
        id=jobs.new_job_id(),
        project_id=project_id,
        model=given_model,
        status=jobs.JobStatus.VALIDATING_FILES.value,
        spec=spec.model_dump(mode="json"),
        training_file=spec.training_file,
        validation_file=spec.validation_file,
        suffix=spec.suffix,
        seed=seed,
        metadata_=spec.metadata,
        queue=queue,
        created_at=now,
        updated_at=now,
        attempt=0,
        max_attempts=settings.max_attempts,
        estimate=estimate,
    )
    events = []
    if source is not None:
        job.base_model = spec.model
        job.parent_job_id = source.job.id
        job.parent_checkpoint_id = source.checkpoint.id if source.checkpoint else None
        events.append(_lineage_event(given_model, spec, source))
    events.append(
        jobs.EventRecord(
            f"Validating training file {training.id}: {training.examples} examples in "
            f"{_format_for(training.format, method)} "
            f"format, about {training.approx_tokens} tokens; queue '{queue}'."
        )
    )
    quotas.reserve_active_job(session, settings, project_id)  # last: holds the project's lock
    jobs.add_job(session, job, [f"Created fine-tuning job: {job.id}"])
    jobs.append_events(session, job.id, events)
    _enqueue_after_commit(session, job.id, queue)
    return job


def _unknown_source(name: str) -> BadRequest:
    return BadRequest(
        f"Model '{name}' is neither a base model on offer nor a fine-tuned model or checkpoint of a "
        "succeeded job of this project; GET /v1/models lists them.",
        param="model",
        code="model_not_available",
    )


def _continued_spec(
    session: Session, project_id: str, spec: JobSpec
) -> tuple[lineage.Source | None, JobSpec]:
    """For a `model` naming a fine-tuned model or checkpoint: the source, and the spec as the
    worker runs it, with `model` the original base id. The source's weights are trained on, so
    its adapter carries over (type and shape; another `adapter.type` is a 400): a PEFT source
    stays that adapter, since a new adapter trained on top of it would not load onto the original
    base, and a full source stays full. The one change of type: a PEFT source whose job exported
    merged weights is full weights too, so its final model (not a checkpoint) continues with
    `full`. A base `model`: (None, the spec unchanged)."""
    if not lineage.is_fine_tuned_name(spec.model):
        if spec.continue_ is not None:
            raise BadRequest(
                "'continue' applies only to a job whose model is a fine-tuned model or checkpoint.",
                param="continue",
                code="invalid_continue",
            )
        return None, spec
    source = lineage.find_source(session, project_id, spec.model)
    if source is None:
        raise _unknown_source(spec.model)
    parent = JobSpec.model_validate(source.job.spec)
    if "reward_model" in (spec.method.type, parent.method.type):
        # A reward model's adapter carries a classification head, not a language-model one.
        raise BadRequest(
            f"Model '{spec.model}' cannot be continued with method {spec.method.type}: a reward_model "
            "job starts from a base model, and a reward model is continued by no method.",
            param="model",
            code="invalid_model",
        )
    adapter = spec.adapter if "adapter" in spec.model_fields_set else parent.adapter
    if parent.adapter.type == "full":
        if adapter.type != "full":
            raise BadRequest(
                f"Model '{spec.model}' has full weights; a job continuing from it fine-tunes them in full "
                "(an adapter trained on them would not load onto the original base), so adapter.type "
                "must be 'full' (or left out). To train an adapter, start from the base model.",
                param="adapter.type",
                code="invalid_adapter",
            )
    elif (
        adapter.type != "full"
        or source.checkpoint is not None
        or not lineage.has_merged_weights(session, source.job)
    ):  # not the one change of type: full fine-tuning of the parent's merged weights
        if adapter.type != parent.adapter.type:
            raise BadRequest(
                f"Model '{spec.model}' is a {parent.adapter.type} adapter; a job continuing from it "
                f"trains that adapter, so adapter.type must be '{parent.adapter.type}' (or left out). "
                "To train another adapter type, start from the base model; to fine-tune this model in "
                "full (adapter.type 'full'), continue from the fine-tuned model (not a checkpoint) of a "
                'job created with "export": ["merged"].',
                param="adapter.type",
                code="invalid_adapter",
            )
        adapter = parent.adapter
    if spec.continue_ is not None and spec.continue_.optimizer_state and source.checkpoint is None:
        raise BadRequest(
            "continue.optimizer_state needs a checkpoint as model (ft:...:ckpt-step-N): only checkpoints "
            "keep the optimizer and scheduler state.",
            param="continue.optimizer_state",
            code="invalid_continue",
        )
    return source, spec.model_copy(update={"model": parent.model, "adapter": adapter})


def _lineage_event(given: str, spec: JobSpec, source: lineage.Source) -> jobs.EventRecord:
    checkpoint = source.checkpoint
    where = f"checkpoint {checkpoint.id} (step {checkpoint.step_number})" if checkpoint else "final weights"
    if lineage.trains_merged_weights(source.job.spec, spec.model_dump(mode="json")) and not checkpoint:
        where = "final weights, merged"
    optimizer = spec.continue_ is not None and spec.continue_.optimizer_state
    state = "optimizer and scheduler state resumed" if optimizer else "fresh optimizer state"
    return jobs.EventRecord(
        f"Continuing from {given}: job {source.job.id}, {where}; base model {spec.model}; {state}.",
        data={
            "parent": {"job": source.job.id, "checkpoint": checkpoint.id if checkpoint else None},
            "model": given,
            "base_model": spec.model,
            "optimizer_state": optimizer,
        },
    )


def cancel_job(session: Session, job: jobs.Job) -> jobs.Job:
    """validating_files/queued/paused -> cancelled at once; a running job gets a cancel request
    that its worker acts on at the next step."""
    return jobs.cancel_job(session, job)


def pause_job(session: Session, job: jobs.Job) -> jobs.Job:
    """queued -> paused at once; a running job gets a pause request (its worker checkpoints,
    then pauses)."""
    return jobs.pause_job(session, job)


def resume_job(session: Session, job: jobs.Job) -> jobs.Job:
    """paused -> queued, and back to the workers after the commit."""
    job = jobs.resume_job(session, job)
    _enqueue_after_commit(session, job.id, job.queue)
    return job
