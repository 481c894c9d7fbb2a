"""The deep checks of `validating_files`: the files read with the training readers and measured
with the base model's real tokenizer. A failure ends the job in `failed` with
`error.code = "invalid_training_file"` and a message naming the file and the problem; an error of
the worker's own (`internal_error`, or `disk_full`) names an incident in the worker's log."""

from __future__ import annotations

import logging
import shutil
import traceback
import uuid
from typing import Any

from tuneforge.db import session_scope
from tuneforge.models.file import File
from tuneforge.models.job import EventRecord, Job, JobStatus, transition
from tuneforge.models.spec import JobSpec
from tuneforge.worker import incidents, jobstate
from tuneforge.worker.tokstore import StoreCache

log = logging.getLogger(__name__)

INVALID_FILE = "invalid_training_file"


def validate_job(job_id: str, ctx: Any) -> bool:
    """validating_files -> queued (True) or failed (False). A job that is no longer validating
    (a duplicate message, a cancel) is left alone and True returned so the caller tries to claim."""
    with session_scope(ctx.sessions) as session:
        job = session.get(Job, job_id)
        if job is None or job.status != JobStatus.VALIDATING_FILES:
            return job is not None
        spec = JobSpec.model_validate(job.spec)
        files = {"training_file": session.get(File, job.training_file)}
        if job.validation_file:
            files["validation_file"] = session.get(File, job.validation_file)
        keys = {param: (f.storage_key, f.filename, f.id) for param, f in files.items() if f is not None}
    work = ctx.settings.work_dir / job_id / f"validate-{uuid.uuid4().hex[:6]}"
    code = INVALID_FILE
    try:
        problem, param, summary = _check(spec, keys, ctx, work)
    except Exception as error:  # a tokenizer that does not load, a store that fails, a full disk
        code = incidents.DISK_FULL if incidents.is_disk_full(error) else incidents.INTERNAL_ERROR
        found = incidents.report(job_id, code, f"validation: {error!r}", detail=traceback.format_exc())
        problem, param, summary = f"could not validate the files: {found.message}", None, {}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    with session_scope(ctx.sessions) as session:
        if problem is not None:
            failure = {"code": code, "message": problem, "param": param}
            failed = EventRecord(f"Validation failed: {problem}", level="error", data={"code": code})
            jobstate.fail_unclaimed(session, job_id, [JobStatus.VALIDATING_FILES], failure, [failed])
            return False
        events = [EventRecord(summary.pop("message"), data=summary)]
        if summary.get("warnings"):
            counts = ", ".join(f"{k}={v}" for k, v in summary["warnings"].items())
            events.append(EventRecord(f"Data warnings (training continues): {counts}", level="warn"))
        events.append(EventRecord("Job queued."))
        transition(session, job_id, JobStatus.QUEUED, sources=[JobStatus.VALIDATING_FILES], events=events)
    return True


def _check(
    spec: JobSpec, keys: dict[str, tuple[str, str, str]], ctx: Any, work: Any
) -> tuple[str | None, str | None, dict[str, Any]]:
    from transformers import AutoTokenizer

    from tuneforge.training import tokcache
    from tuneforge.training.base_models import UnknownModel, resolve_model_path

    if "training_file" not in keys:
        return f"training file {spec.training_file} no longer exists", "training_file", {}
    try:
        model_dir = resolve_model_path(spec.model, ctx.settings.models, ctx.settings.models_dir)
    except UnknownModel:
        return f"model {spec.model!r} is not on offer on this worker", "model", {}
    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=ctx.settings.trust_remote_code)
    summary: dict[str, Any] = {"files": {}, "warnings": {}}
    # What this measures, training takes from the tokenization cache (tuneforge/training/tokcache.py).
    cache = StoreCache(ctx.store, work / "tokcache") if ctx.settings.tokenization_cache else None
    tokcache.configure(cache.directory if cache else None)
    try:
        return _check_files(spec, keys, ctx, work, tokenizer, cache, summary)
    finally:
        tokcache.configure(None)


def _check_files(
    spec: JobSpec,
    keys: dict[str, tuple[str, str, str]],
    ctx: Any,
    work: Any,
    tokenizer: Any,
    cache: StoreCache | None,
    summary: dict[str, Any],
) -> tuple[str | None, str | None, dict[str, Any]]:
    from tuneforge.training.data import DataError, read_training_file

    max_len = spec.hyperparameters.max_seq_length
    for param, (key, filename, file_id) in keys.items():
        path = work / f"{param}.jsonl"
        ctx.store.download(key, path)
        if cache is not None:
            cache.pull([path])
        try:
            data = read_training_file(
                path,
                spec.method.type,
                tokenizer,
                max_len,
                split="train" if param == "training_file" else "validation",
            )
            rft = spec.method.reinforcement if spec.method.type == "reinforcement" else None
            if rft is not None:  # every line has the fields the grader reads
                from tuneforge.training.grpo import check_item_references

                check_item_references(path, rft.grader)
        except DataError as error:
            return f"{file_id} ({filename}): {str(error).split(': ', 1)[-1]}", param, {}
        stats = data.stats
        too_long = data.warnings.get("truncated_examples", 0)
        if stats.examples and too_long == stats.examples:
            return (
                f"{file_id} ({filename}): every one of its {stats.examples} examples is longer than "
                f"max_seq_length={max_len} tokens (shortest {stats.min_tokens}); raise max_seq_length",
                param,
                {},
            )
        summary["files"][param] = {"id": file_id, **stats.as_dict()}
        if cache is not None:
            cache.push()
        for name, count in data.warnings.items():
            summary["warnings"][f"{param}.{name}"] = count
    train = summary["files"]["training_file"]
    summary["message"] = (
        f"Files validated: {train['examples']} training examples, {train['tokens']} tokens "
        f"(longest {train['max_tokens']}, max_seq_length {max_len})."
    )
    return None, None, summary
