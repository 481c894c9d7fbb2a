"""Running one job: validate its files, claim it, supervise its training process, report, store.

The Celery task (tuneforge/worker/tasks.py) calls `run_job(job_id, context)`. This process never
imports torch for training: a fresh child process trains (tuneforge/worker/child.py) while this
one renews the lease, turns the child's messages into batched events, uploads checkpoints and
artifacts, and passes cancel and pause requests on as a cooperative stop flag.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import re
import shutil
import socket
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from tuneforge.config import Settings
from tuneforge.db import make_engine, make_sessionmaker, session_scope, utcnow
from tuneforge.models.checkpoint import (
    Checkpoint,
    add_checkpoint,
    latest_checkpoint,
    new_checkpoint_id,
    put_artifact,
)
from tuneforge.models.file import PURPOSE_RESULTS, File, add_file, new_file_id, storage_key_for
from tuneforge.models.job import Job, JobStatus
from tuneforge.models.project import get_project
from tuneforge.storage import ObjectStore, open_store
from tuneforge.worker import jobstate
from tuneforge.worker.jobstate import EventRecord
from tuneforge.worker.packaging import adapter_only, extract_tarball, make_tarball, upload
from tuneforge.worker.supervisor import TrainingProcess, describe_exit

log = logging.getLogger(__name__)

FLUSH_EVERY_S = 1.0
READY_TIMEOUT_S = 600.0
TARBALL = "application/gzip"


@dataclass
class WorkerContext:
    settings: Settings
    sessions: sessionmaker[Session]
    store: ObjectStore
    owner: str = field(default_factory=lambda: f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}")

    @classmethod
    def from_settings(cls, settings: Settings) -> WorkerContext:
        engine = make_engine(settings.database_url, pool_size=2, max_overflow=2)
        return cls(
            settings, make_sessionmaker(engine), open_store(settings.storage_url, settings.s3_endpoint_url)
        )


# A training process started ahead of its job (see `prepare_training_process`).
_warm: TrainingProcess | None = None


def _child_log_path(settings: Settings) -> Path:
    return settings.work_dir / "logs" / f"train-{uuid.uuid4().hex}.log"


def prepare_training_process(settings: Settings) -> None:
    """Starts a training process that imports the training stack while this worker waits for a job."""
    global _warm
    if _warm is None or not _warm.alive():
        _warm = TrainingProcess.spawn(_child_log_path(settings))


def _take_training_process(settings: Settings) -> TrainingProcess:
    global _warm
    process, _warm = _warm, None
    if process is not None and process.alive():
        return process
    return TrainingProcess.spawn(_child_log_path(settings))


def release_training_process() -> None:
    global _warm
    if _warm is not None:
        _warm.stop(grace=1.0)
        _warm = None


def fine_tuned_model_name(base: str, project: str, suffix: str | None, job_id: str) -> str:
    """`ft:{base}:{project}:{suffix}:{short job id}` (OpenAI's shape; the suffix may be empty)."""
    safe_project = re.sub(r"[^a-z0-9_-]+", "-", project.lower()).strip("-") or "project"
    short = job_id.removeprefix("ftjob-")[-8:]
    return f"ft:{base}:{safe_project}:{suffix or ''}:{short}"


def checkpoint_state_key(adapter_key: str) -> str:
    """A checkpoint row's `storage_key` is its adapter archive (what the checkpoint download
    endpoint serves); the full trainer state for resuming lies beside it."""
    return adapter_key.rsplit("/", 1)[0] + "/state.tar.gz"


def run_job(job_id: str, ctx: WorkerContext) -> str:
    """Everything one task message asks for. Returns what happened (for logs and tests)."""
    with session_scope(ctx.sessions) as session:
        job = session.get(Job, job_id)
        if job is None:
            return "missing"
        status = job.status
    if status == JobStatus.VALIDATING_FILES:
        from tuneforge.worker.validation import validate_job

        if not validate_job(job_id, ctx):
            return "invalid"
    with session_scope(ctx.sessions) as session:
        job = jobstate.claim_job(session, job_id, ctx.owner, ctx.settings.lease_seconds)
        if job is None:
            return "not-claimed"
        checkpoint = latest_checkpoint(session, job_id)
        files = {
            f.id: f
            for f in session.scalars(
                select(File).where(File.id.in_([job.training_file, job.validation_file or ""]))
            )
        }
        project = get_project(session, job.project_id)
        run = JobRun(
            ctx,
            job_id=job_id,
            spec=dict(job.spec),
            attempt=job.attempt,
            max_attempts=job.max_attempts,
            model=job.model,
            suffix=job.suffix,
            project_name=project.name if project is not None else job.project_id,
            project_id=job.project_id,
            train_key=files[job.training_file].storage_key,
            valid_key=files[job.validation_file].storage_key if job.validation_file else None,
            checkpoint=(checkpoint.id, checkpoint.step_number, checkpoint.storage_key)
            if checkpoint
            else None,
        )
        note = f" from checkpoint at step {checkpoint.step_number}" if checkpoint else ""
        jobstate.add_events(
            session, job_id, [EventRecord(f"Fine-tuning job started (attempt {job.attempt}){note}.")]
        )
    return run.execute()


class LeaseLost(Exception):
    """Another worker owns the job now (this one was presumed dead)."""


class JobRun:
    """One attempt at one claimed job."""

    def __init__(
        self,
        ctx: WorkerContext,
        *,
        job_id: str,
        spec: dict[str, Any],
        attempt: int,
        max_attempts: int,
        model: str,
        suffix: str | None,
        project_name: str,
        project_id: str,
        train_key: str,
        valid_key: str | None,
        checkpoint: tuple[str, int, str] | None,
    ) -> None:
        self.ctx = ctx
        self.settings = ctx.settings
        self.store = ctx.store
        self.job_id = job_id
        self.spec = spec
        self.attempt = attempt
        self.max_attempts = max_attempts
        self.model = model
        self.suffix = suffix
        self.project_name = project_name
        self.project_id = project_id
        self.train_key = train_key
        self.valid_key = valid_key
        self.checkpoint = checkpoint
        self.resume_step = checkpoint[1] if checkpoint else 0
        self.work = self.settings.work_dir / job_id / f"attempt-{attempt}-{uuid.uuid4().hex[:6]}"
        self.pending: list[EventRecord] = []
        self.progress: dict[str, Any] | None = None
        self.progress_dirty = False
        self.params: dict[str, int] = {}
        self.first_metrics: tuple[float, int] | None = None
        self.last_metrics: dict[str, Any] = {}
        self.stop_sent: str | None = None
        self.process: TrainingProcess | None = None
        self.run_sent_at = time.monotonic()

    # --- the run ------------------------------------------------------------------------------

    def execute(self) -> str:
        try:
            return self._execute()
        except LeaseLost:
            log.warning("job %s: lease lost to another worker; stopping this run", self.job_id)
            return "lease-lost"
        except Exception as error:
            log.exception("job %s: worker error", self.job_id)
            self._fail("internal_error", f"{type(error).__name__}: {error}")
            return "failed"
        finally:
            if self.process is not None:
                self.process.stop(grace=2.0)
                log_path = self.process.log_path
                log_path.unlink(missing_ok=True)
            shutil.rmtree(self.work, ignore_errors=True)
            with contextlib.suppress(OSError):
                self.work.parent.rmdir()  # the job's directory, once no attempt uses it

    def _execute(self) -> str:
        inputs = self.work / "inputs"
        train_file = inputs / "train.jsonl"
        self.store.download(self.train_key, train_file)
        valid_file = None
        if self.valid_key:
            valid_file = inputs / "valid.jsonl"
            self.store.download(self.valid_key, valid_file)
        resume_from = None
        if self.checkpoint is not None:
            archive = inputs / "resume.tar.gz"
            self.store.download(checkpoint_state_key(self.checkpoint[2]), archive)
            resume_from = extract_tarball(archive, inputs / f"checkpoint-{self.checkpoint[1]}")
        out_dir = self.work / "out"
        out_dir.mkdir(parents=True, exist_ok=True)

        self.process = _take_training_process(self.settings)
        if not self.process.wait_ready(READY_TIMEOUT_S):
            # A spare that died while it waited (killed, or the code changed under it) must not
            # cost the job: start a fresh one once before giving up.
            log.warning("job %s: the waiting training process is gone; starting a fresh one", self.job_id)
            self.process.stop(grace=1.0)
            self.process = TrainingProcess.spawn(_child_log_path(self.settings))
            if not self.process.wait_ready(READY_TIMEOUT_S):
                code, message = describe_exit(self.process.exit_code())
                return self._fail(code, f"the training process did not start: {message}", self.process)
        self.process.send(
            {
                "op": "run",
                "spec": self.spec,
                "paths": {
                    "train_file": str(train_file),
                    "valid_file": str(valid_file) if valid_file else None,
                    "out_dir": str(out_dir),
                    "resume_from": str(resume_from) if resume_from else None,
                },
                "models": self.settings.models,
                "models_dir": str(self.settings.models_dir),
                "runner": os.environ.get("TUNEFORGE_TRAINING_RUNNER") or None,
            }
        )
        self.run_sent_at = time.monotonic()
        return self._supervise(self.process)

    def _supervise(self, process: TrainingProcess) -> str:
        next_flush = time.monotonic() + FLUSH_EVERY_S
        while True:
            timeout = max(0.0, next_flush - time.monotonic())
            try:
                message = process.messages.get(timeout=timeout)
            except queue.Empty:
                message = {"type": "tick"}
            if message is None:
                with contextlib.suppress(Exception):
                    process.popen.wait(timeout=10)
                code, text = describe_exit(process.exit_code())
                return self._fail(code, text, process)
            kind = message.get("type")
            if kind == "start":
                self._on_start(message)
            elif kind == "metrics":
                self._on_metrics(message)
            elif kind == "checkpoint":
                self._on_checkpoint(process, message)
            elif kind == "result":
                return self._on_result(message)
            elif kind == "error":
                with contextlib.suppress(Exception):
                    process.popen.wait(timeout=30)
                events = [EventRecord(message.get("traceback") or "", level="error", type="message")]
                return self._fail(message.get("code", "training_error"), message["message"], process, events)
            if time.monotonic() >= next_flush:
                self._flush_and_renew(process)
                next_flush = time.monotonic() + FLUSH_EVERY_S

    # --- messages from the training process ----------------------------------------------------

    def _on_start(self, message: dict[str, Any]) -> None:
        total = int(message["total_steps"])
        start = int(message.get("start_step") or 0)
        self.resume_step = max(self.resume_step, start)
        self.params = {
            "trainable_params": int(message["trainable_params"]),
            "total_params": int(message["total_params"]),
        }
        self.progress = {"step": start, "total_steps": total, "epoch": 0.0, "eta_seconds": None}
        self.progress_dirty = True
        hp = message.get("hyperparameters") or {}
        text = f"Training started: {total} steps on {message['num_examples']} examples"
        if start:
            text += f", resuming after step {start}"
        where = {
            "worker": self.ctx.owner,
            "training_pid": self.process.pid if self.process else None,
            "setup_seconds": round(time.monotonic() - self.run_sent_at, 3),  # model load, data, trainer
        }
        self.pending.append(EventRecord(text + ".", data={"hyperparameters": hp, **self.params, **where}))
        self._flush()

    def _on_metrics(self, message: dict[str, Any]) -> None:
        step = int(message["step"])
        if step <= self.resume_step:
            return  # logged by an earlier attempt
        total = int(message["total_steps"])
        now = time.monotonic()
        if self.first_metrics is None:
            self.first_metrics = (now, step)
            eta = None
        else:
            t0, s0 = self.first_metrics
            eta = round((now - t0) / (step - s0) * (total - step), 1) if step > s0 else None
        data = {k: v for k, v in message.items() if k != "type" and v is not None}
        parts = [f"Step {step}/{total}"]
        if message.get("train_loss") is not None:
            parts.append(f"training loss={message['train_loss']:.4f}")
        if message.get("valid_loss") is not None:
            parts.append(f"validation loss={message['valid_loss']:.4f}")
        self.pending.append(
            EventRecord(
                ": ".join([parts[0], ", ".join(parts[1:])]) if parts[1:] else parts[0],
                type="metrics",
                data=data,
                at=utcnow(),
            )
        )
        self.progress = {
            "step": step,
            "total_steps": total,
            "epoch": message.get("epoch"),
            "eta_seconds": eta,
        }
        self.progress_dirty = True
        self.last_metrics = data

    def _on_checkpoint(self, process: TrainingProcess, message: dict[str, Any]) -> None:
        step = int(message["step"])
        path = Path(message["path"])
        checkpoint_id = new_checkpoint_id()
        key = f"jobs/{self.job_id}/checkpoints/{checkpoint_id}"
        tmp = self.work / "upload"
        self.store.put_file(f"{key}/state.tar.gz", make_tarball(path, tmp / "state.tar.gz"))
        key = f"{key}/adapter.tar.gz"  # the row points at the adapter; the state lies beside it
        self.store.put_file(key, make_tarball(path, tmp / "adapter.tar.gz", adapter_only))
        shutil.rmtree(tmp, ignore_errors=True)
        raw = {**self.last_metrics, **(message.get("metrics") or {})}
        metrics = {"step": step}
        for name in (
            "train_loss",
            "train_mean_token_accuracy",
            "valid_loss",
            "valid_mean_token_accuracy",
            "full_valid_loss",
            "full_valid_mean_token_accuracy",
        ):
            if raw.get(name) is not None:
                metrics[name] = raw[name]
        pruned: list[str] = []
        with session_scope(self.ctx.sessions) as session:
            self._renew(session)
            self._write_pending(session)
            add_checkpoint(
                session,
                self.job_id,
                step_number=step,
                storage_key=key,
                metrics=metrics,
                checkpoint_id=checkpoint_id,
            )
            jobstate.add_events(
                session,
                self.job_id,
                [
                    EventRecord(
                        f"Checkpoint saved at step {step}.", data={"checkpoint": checkpoint_id, "step": step}
                    )
                ],
            )
            older = list(
                session.scalars(
                    select(Checkpoint)
                    .where(Checkpoint.job_id == self.job_id)
                    .order_by(Checkpoint.step_number.desc(), Checkpoint.created_at.desc())
                    .offset(self.settings.keep_checkpoints)
                )
            )
            for row in older:
                pruned.append(row.storage_key)
                session.delete(row)
        for old_key in pruned:
            self.store.delete_prefix(old_key.rsplit("/", 1)[0] + "/")
        process.send({"op": "ack", "step": step})

    def _on_result(self, message: dict[str, Any]) -> str:
        stopped = message.get("stopped")
        final_step = int(message.get("final_step") or 0)
        total = int(message.get("total_steps") or 0)
        progress = {
            "step": final_step,
            "total_steps": total,
            "epoch": (self.progress or {}).get("epoch"),
            "eta_seconds": 0 if not stopped else None,
        }
        if stopped == "cancel":
            with session_scope(self.ctx.sessions) as session:
                self._write_pending(session)
                if not jobstate.finish_run(
                    session, self.job_id, self.ctx.owner, JobStatus.CANCELLED, progress=progress
                ):
                    raise LeaseLost
                jobstate.add_events(
                    session, self.job_id, [EventRecord(f"Job cancelled at step {final_step}.")]
                )
            return "cancelled"
        if stopped == "pause":
            with session_scope(self.ctx.sessions) as session:
                self._write_pending(session)
                if not jobstate.finish_run(
                    session,
                    self.job_id,
                    self.ctx.owner,
                    JobStatus.PAUSED,
                    progress=progress,
                    pause_requested_at=None,
                    attempt=Job.attempt - 1,  # a pause is not a failed attempt (max_attempts)
                ):
                    raise LeaseLost
                jobstate.add_events(
                    session,
                    self.job_id,
                    [EventRecord(f"Job paused at step {final_step}; resume continues from its checkpoint.")],
                )
            return "paused"

        artifacts: list[tuple[str, str, int, str]] = []
        for name, field_name in (
            ("adapter", "adapter_dir"),
            ("model", "model_dir"),
            ("merged", "merged_dir"),
        ):
            source = message.get(field_name)
            if source:
                archive = make_tarball(Path(source), self.work / "artifacts" / f"{name}.tar.gz")
                key = f"jobs/{self.job_id}/artifacts/{name}.tar.gz"
                size, digest = upload(self.store, key, archive)
                artifacts.append((name, key, size, digest))
                archive.unlink()
        result_file_id = None
        csv_size = 0
        if message.get("metrics_csv") and Path(message["metrics_csv"]).is_file():
            result_file_id = new_file_id()
            csv_size = self.store.put_file(storage_key_for(result_file_id), Path(message["metrics_csv"]))
        name = fine_tuned_model_name(self.model, self.project_name, self.suffix, self.job_id)
        with session_scope(self.ctx.sessions) as session:
            self._write_pending(session)
            if result_file_id is not None:
                add_file(
                    session,
                    file_id=result_file_id,
                    project_id=self.project_id,
                    filename="step_metrics.csv",
                    purpose=PURPOSE_RESULTS,
                    size=csv_size,
                    storage_key=storage_key_for(result_file_id),
                    format="csv",
                )
            for art_name, key, size, digest in artifacts:
                put_artifact(
                    session,
                    self.job_id,
                    name=art_name,
                    storage_key=key,
                    size=size,
                    sha256=digest,
                    content_type=TARBALL,
                )
            if not jobstate.finish_run(
                session,
                self.job_id,
                self.ctx.owner,
                JobStatus.SUCCEEDED,
                progress=progress,
                fine_tuned_model=name,
                trained_tokens=int(message.get("trained_tokens") or 0),
                result_files=[result_file_id] if result_file_id else [],
                **self.params,
            ):
                raise LeaseLost
            final = message.get("metrics") or {}
            jobstate.add_events(
                session,
                self.job_id,
                [
                    EventRecord(f"New fine-tuned model created: {name}", data={"metrics": final}),
                    EventRecord("The job has successfully completed."),
                ],
            )
        return "succeeded"

    # --- reporting -----------------------------------------------------------------------------

    def _renew(self, session: Session) -> jobstate.LeaseState:
        state = jobstate.renew_lease(session, self.job_id, self.ctx.owner, self.settings.lease_seconds)
        if not state.held:
            raise LeaseLost
        return state

    def _write_pending(self, session: Session) -> None:
        if self.pending:
            jobstate.add_events(session, self.job_id, self.pending)
            self.pending = []
        if self.progress_dirty:
            jobstate.update_running(
                session, self.job_id, self.ctx.owner, progress=self.progress, **self.params
            )
            self.progress_dirty = False

    def _flush(self) -> jobstate.LeaseState:
        with session_scope(self.ctx.sessions) as session:
            state = self._renew(session)
            self._write_pending(session)
        return state

    def _flush_and_renew(self, process: TrainingProcess) -> None:
        state = self._flush()
        if state.cancel_requested and self.stop_sent != "cancel":
            process.send({"op": "stop", "reason": "cancel"})
            self.stop_sent = "cancel"
        elif state.pause_requested and self.stop_sent is None:
            process.send({"op": "stop", "reason": "pause"})
            self.stop_sent = "pause"

    def _fail(
        self,
        code: str,
        message: str,
        process: TrainingProcess | None = None,
        extra: list[EventRecord] | None = None,
    ) -> str:
        events = list(extra or [])
        if process is not None:
            lines = process.last_log_lines(20)
            if lines:
                events.append(
                    EventRecord("Last lines of the training log:\n" + "\n".join(lines), level="error")
                )
        events.append(EventRecord(f"Fine-tuning job failed: {message}", level="error"))
        with session_scope(self.ctx.sessions) as session:
            try:
                self._write_pending(session)
            except Exception:
                self.pending = []
            if jobstate.finish_run(
                session,
                self.job_id,
                self.ctx.owner,
                JobStatus.FAILED,
                error={"code": code, "message": message, "param": None},
            ):
                jobstate.add_events(session, self.job_id, events)
        return "failed"
