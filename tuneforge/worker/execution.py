"""Running one job: validate its files, claim it, supervise its training process, report, store.

The Celery task (tuneforge/worker/tasks.py) calls `run_job(job_id, context)`. This process never
imports torch for training: a fresh child process trains (tuneforge/worker/child.py) while this
one renews the lease, turns the child's messages into batched events, uploads checkpoints and
artifacts, and passes cancel and pause requests on as a cooperative stop flag.

Faults around the run do not cost the job (tuneforge/worker/resilience.py): while the database is
unreachable, events, progress and checkpoint rows are held in memory and training goes on; they
are written when it answers again, unless the outage outlasts the lease. A worker asked to shut
down checkpoints its job and hands it back to its queue within its grace period.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import re
import shutil
import signal
import socket
import sys
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, NamedTuple

from sqlalchemy.orm import Session, sessionmaker

from tuneforge.config import Settings
from tuneforge.db import make_engine, make_sessionmaker, session_scope, utcnow
from tuneforge.estimates.ceilings import OverCeiling, check_ceilings, training_file_stats
from tuneforge.models import lineage
from tuneforge.models.checkpoint import new_checkpoint_id
from tuneforge.models.file import new_file_id
from tuneforge.models.job import Job, JobStatus
from tuneforge.models.spec import JobSpec
from tuneforge.storage import ObjectStore, open_store
from tuneforge.storage.base import ObjectNotFound
from tuneforge.storage.keys import CheckpointKeys, artifact_key, file_key
from tuneforge.worker import fairshare, incidents, jobstate, launcher, oom, resilience
from tuneforge.worker.dispatch import enqueue_job
from tuneforge.worker.evaluation import JobEvaluation, describe
from tuneforge.worker.jobstate import EventRecord, RunPlan, StoredArtifact
from tuneforge.worker.observability import RunMetrics
from tuneforge.worker.packaging import adapter_only, extract_tarball, make_tarball, upload
from tuneforge.worker.resilience import (
    LeaseClock,
    Outage,
    OutageOutlastedLease,
    describe_error,
    is_transient,
    retry_transient,
)
from tuneforge.worker.supervisor import TrainingProcess, describe_exit
from tuneforge.worker.tokstore import StoreCache

log = logging.getLogger(__name__)

FLUSH_EVERY_S = 1.0
READY_TIMEOUT_S = 600.0
TARBALL = "application/gzip"
# Of a shutdown's grace period, what the training process gets to checkpoint; the rest is for
# handing the job back and for the worker to exit.
CHECKPOINT_SHARE_OF_GRACE = 0.7
EXIT_MARGIN_S = 1.0
# How long a training process killed by SIGINT/SIGTERM waits for its worker's shutdown request.
SHUTDOWN_NOTICE_WAIT_S = 3.0

# Checkpoint metrics kept on the checkpoint row (what the checkpoints list shows).
CHECKPOINT_METRICS = (
    "train_loss",
    "train_mean_token_accuracy",
    "valid_loss",
    "valid_mean_token_accuracy",
    "full_valid_loss",
    "full_valid_mean_token_accuracy",
    "eval_score",
    "base_eval_score",
    "reward",  # reinforcement fine-tuning (tuneforge.training.grpo)
    "reward_std",
    "kl",
    "completion_length",
    "eval_reward",
)


class RunOutcome(StrEnum):
    """What one task message came to (for logs and tests)."""

    MISSING = "missing"  # no such job
    INVALID = "invalid"  # its files failed validation
    NOT_CLAIMED = "not-claimed"  # not runnable, or another worker has it
    SUCCEEDED = "succeeded"
    CANCELLED = "cancelled"
    PAUSED = "paused"
    FAILED = "failed"
    LEASE_LOST = "lease-lost"  # another worker took the job over
    HANDED_BACK = "handed-back"  # this worker is shutting down; the job waits in its queue


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
        log.info("spare training process %s started", _warm.pid)


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


def run_job(job_id: str, ctx: WorkerContext) -> RunOutcome:
    """Everything one task message asks for."""
    with session_scope(ctx.sessions) as session:
        job = session.get(Job, job_id)
        if job is None:
            return RunOutcome.MISSING
        status, queue = job.status, job.queue
    if status == JobStatus.VALIDATING_FILES:
        from tuneforge.worker.validation import validate_job

        if not validate_job(job_id, ctx):
            return RunOutcome.INVALID
    if resilience.shutdown_requested_at() is not None:
        enqueue_job(job_id, queue)  # for another worker; this one is on its way out
        return RunOutcome.HANDED_BACK
    claimed_at = time.monotonic()
    # The message is a claim token for its queue: run the fairest waiting job of the queue,
    # which may be another project's (tuneforge/worker/fairshare.py).
    plan = fairshare.claim_fairest(
        ctx.sessions,
        queue,
        lambda session, picked: jobstate.claim_run(session, picked, ctx.owner, ctx.settings.lease_seconds),
    )
    if plan is None:
        return RunOutcome.NOT_CLAIMED
    run = JobRun(ctx, plan, claimed_at)
    outcome = run.execute()
    run.metrics.finished(outcome.value)
    return outcome


class SourceGone(Exception):
    """The model or checkpoint a continued job starts from is no longer stored."""


class LeaseLost(Exception):
    """Another worker owns the job now (this one was presumed dead)."""


class HeldCheckpoint(NamedTuple):
    """A stored checkpoint whose row is not written yet (it goes with the next write)."""

    checkpoint_id: str
    step: int
    storage_key: str
    metrics: dict[str, Any]


class JobRun:
    """One attempt at one claimed job."""

    def __init__(self, ctx: WorkerContext, plan: RunPlan, claimed_at: float | None = None) -> None:
        self.ctx = ctx
        self.settings = ctx.settings
        self.store = ctx.store
        self.plan = plan
        self.job_id = plan.job_id
        self.logged_step = max(plan.logged_step, plan.resume.step if plan.resume else 0)
        self.work = self.settings.work_dir / plan.job_id / f"attempt-{plan.attempt}-{uuid.uuid4().hex[:6]}"
        # Events and checkpoint rows not written yet, in the order they happened.
        self.pending: list[EventRecord | HeldCheckpoint] = []
        self.progress: dict[str, Any] | None = None
        self.progress_dirty = False
        self.params: dict[str, int] = {}
        self.first_metrics: tuple[float, int] | None = None
        self.last_metrics: dict[str, Any] = {}
        self.stop_sent: str | None = None
        self.requests = jobstate.LeaseState(held=True)  # the cancel/pause requests last read
        self.process: TrainingProcess | None = None
        self.run_sent_at = time.monotonic()
        self.lease = LeaseClock(self.settings.lease_seconds, claimed_at)
        self.outage = Outage(self.job_id, self.lease)
        self.handback_deadline: float | None = None  # set when the worker is asked to shut down
        self.evaluation: JobEvaluation | None = None  # graded answers (tuneforge/worker/evaluation.py)
        self.evaluated_steps: set[int] = set()
        self.last_tick = time.monotonic()
        self.memory = oom.MemoryPlan()  # the out-of-memory ladder's rung (tuneforge/worker/oom.py)
        self.effective_hp: dict[str, Any] = {}  # the hyperparameters the run reported at its start
        self.stored_checkpoint: Path | None = None  # the newest checkpoint of this run in the store
        self.run_paths: dict[str, str | None] = {}
        self.tokcache: StoreCache | None = None
        self.rank_restarts = 0  # multi-device runs restarted after a lost rank (tuneforge/worker/launcher.py)
        self.ranks_not_ready: str | None = None  # why the last multi-device start failed
        self.metrics = RunMetrics(ctx.sessions, plan)  # Prometheus (tuneforge/worker/observability.py)

    # --- the run ------------------------------------------------------------------------------

    def execute(self) -> RunOutcome:
        try:
            with resilience.running_job(self.job_id):
                return self._execute()
        except LeaseLost:
            log.warning("job %s: lease lost to another worker; stopping this run", self.job_id)
            return RunOutcome.LEASE_LOST
        except OutageOutlastedLease as error:
            log.warning("job %s: %s; stopping this run (the job may run elsewhere now)", self.job_id, error)
            return RunOutcome.LEASE_LOST
        except Exception as error:
            if is_transient(error):
                # The database or broker failed where nothing retries: not the job's fault. Its
                # lease runs out and the reconciler queues it again.
                log.exception("job %s: database or broker unreachable; giving the run up", self.job_id)
                return RunOutcome.LEASE_LOST
            log.exception("job %s: worker error", self.job_id)
            return self._fail("internal_error", describe_error(error))
        finally:
            if self.process is not None:
                self.process.stop(grace=2.0)
                log_path = self.process.log_path
                log_path.unlink(missing_ok=True)
            shutil.rmtree(self.work, ignore_errors=True)
            with contextlib.suppress(OSError):
                self.work.parent.rmdir()  # the job's directory, once no attempt uses it

    def _execute(self) -> RunOutcome:
        needed, here = launcher.job_devices(self.plan.spec), launcher.worker_devices(self.settings)
        if needed > here:
            return self._hand_back_for_devices(needed, here)
        try:
            paths = self._download_inputs()
        except SourceGone as gone:
            return self._fail("source_model_unavailable", str(gone))
        try:  # the ceiling may have been lowered since the job was created, paused or queued
            stats = training_file_stats(paths["train_file"] or "")
            check_ceilings(JobSpec.model_validate(self.plan.spec), stats, None, self.settings)
        except OverCeiling as over:
            return self._fail(over.code, over.message)
        process = self._ready_training_process()
        if process is None and self.ranks_not_ready is not None:
            return self._fail("training_error", self.ranks_not_ready, self.process)
        if process is None:
            assert self.process is not None
            code, message = describe_exit(self.process.exit_code())
            return self._fail(code, f"the training process did not start: {message}", self.process)
        process.send(
            {
                "op": "run",
                "spec": self.plan.spec,
                "paths": paths,
                "models": self.settings.models,
                "models_dir": str(self.settings.models_dir),
                "runner": os.environ.get("TUNEFORGE_TRAINING_RUNNER") or None,
            }
        )
        self.run_paths = paths
        self.run_sent_at = time.monotonic()
        return self._supervise(process)

    def _download_inputs(self) -> dict[str, str | None]:
        """The job's files and its resume checkpoint, into this attempt's work directory."""
        inputs = self.work / "inputs"
        train_file = inputs / "train.jsonl"
        self.store.download(self.plan.train_key, train_file)
        valid_file = None
        if self.plan.valid_key:
            valid_file = inputs / "valid.jsonl"
            self.store.download(self.plan.valid_key, valid_file)
        resume_from = None
        if self.plan.resume is not None:
            archive = inputs / "resume.tar.gz"
            self.store.download(CheckpointKeys.parse(self.plan.resume.storage_key).state, archive)
            resume_from = extract_tarball(archive, inputs / f"checkpoint-{self.plan.resume.step}")
        out_dir = self.work / "out"
        out_dir.mkdir(parents=True, exist_ok=True)
        if self.settings.tokenization_cache:
            self.tokcache = StoreCache(self.store, self.work / "tokcache")
            self.tokcache.pull([train_file, valid_file])
        return {
            "tokcache_dir": str(self.tokcache.directory) if self.tokcache else None,
            "train_file": str(train_file),
            "valid_file": str(valid_file) if valid_file else None,
            "out_dir": str(out_dir),
            "resume_from": str(resume_from) if resume_from else None,
            **self._download_source(inputs),
        }

    def _download_source(self, inputs: Path) -> dict[str, str]:
        """A continued job's starting point (its parent's adapter, full weights or checkpoint),
        unpacked: full weights replace the base model directory; an adapter is loaded as the
        trainable adapter; a checkpoint also offers its optimizer state when the spec asks."""
        with session_scope(self.ctx.sessions) as session:
            job = session.get(Job, self.job_id)
            if job is None or job.parent_job_id is None:
                return {}
            found = lineage.source_object(session, job)
        if found is None:
            raise SourceGone(
                "the fine-tuned model or checkpoint this job continues from was deleted (or the "
                "checkpoint pruned) after the job was created"
            )
        archive = inputs / "source.tar.gz"
        try:
            self.store.download(found.storage_key, archive)
        except ObjectNotFound:
            raise SourceGone("the stored weights of the model this job continues from are gone") from None
        source = extract_tarball(archive, inputs / "source")
        archive.unlink()
        paths = {"model_dir": str(source)} if found.full else {"source_adapter": str(source)}
        if found.checkpoint and (self.plan.spec.get("continue") or {}).get("optimizer_state"):
            paths["source_state"] = str(source)
        return paths

    def _ready_training_process(self) -> TrainingProcess | None:
        """The warm training process, or a fresh one if it died while it waited; None when none
        starts (`self.process` then holds the one that failed)."""
        if launcher.job_devices(self.plan.spec) > 1:  # torchrun and its ranks, started per run
            release_training_process()  # this pool process's one job has no use for its spare
            return self._ranks_ready(launcher.spawn_for(self.plan.spec, _child_log_path(self.settings)))
        self.process = _take_training_process(self.settings)
        if self._wait_ready_renewing(self.process):
            return self.process
        # A spare that died while it waited (killed, or the code changed under it) must not
        # cost the job: start a fresh one once before giving up.
        log.warning("job %s: the waiting training process is gone; starting a fresh one", self.job_id)
        self.process.stop(grace=1.0)
        self.process = TrainingProcess.spawn(_child_log_path(self.settings))
        return self.process if self._wait_ready_renewing(self.process) else None

    def _supervise(self, process: TrainingProcess) -> RunOutcome:
        next_flush = time.monotonic() + FLUSH_EVERY_S
        while True:
            wake = min(next_flush, self.handback_deadline or next_flush)
            try:
                message = process.messages.get(timeout=max(0.0, wake - time.monotonic()))
            except queue.Empty:
                message = {"type": "tick"}
            if message is None:
                with contextlib.suppress(Exception):
                    process.popen.wait(timeout=10)
                if self._stopped_with_the_worker(process, None):
                    return self._hand_back(None)
                if isinstance(process, launcher.DistributedTrainingProcess) and self.stop_sent != "cancel":
                    restarted = self._restart_ranks(process)
                    if restarted is not None:
                        process = restarted
                        continue
                    if self.ranks_not_ready is not None:
                        return self._fail("training_error", self.ranks_not_ready, self.process)
                code, text = describe_exit(process.exit_code())
                return self._fail(code, text, process)
            kind = message.get("type")
            if kind == "start":
                self._on_start(message)
            elif kind == "metrics":
                self._on_metrics(message)
            elif kind == "checkpoint":
                self._on_checkpoint(process, message)
            elif kind == "notice":
                self._on_notice(message)
            elif kind == "result":
                return self._on_result(message)
            elif kind == "error":
                with contextlib.suppress(Exception):
                    process.popen.wait(timeout=30)
                if self._stopped_with_the_worker(process, message):
                    return self._hand_back(None)
                if launcher.lost_peer(process, message) and self.stop_sent != "cancel":
                    restarted = self._restart_ranks(process, str(message.get("message", ""))[:300])
                    if restarted is not None:
                        process = restarted
                        continue
                    if self.ranks_not_ready is not None:
                        return self._fail("training_error", self.ranks_not_ready, self.process)
                code = message.get("code", "training_error")
                if code == oom.OUT_OF_MEMORY:
                    if resilience.shutdown_requested_at() is not None:
                        return self._hand_back(None)
                    retried = self._retry_out_of_memory(process)
                    if retried is not None:
                        process = retried
                        continue
                    text = oom.exhausted_message(self.memory, message.get("advice") or [])
                    return self._fail(code, text, process, detail=message.get("traceback") or "")
                return self._fail(code, message["message"], process, detail=message.get("traceback") or "")
            self._notice_shutdown(process)
            if self.handback_deadline is not None and time.monotonic() >= self.handback_deadline:
                log.warning(
                    "job %s: no checkpoint within the shutdown grace; handing back without", self.job_id
                )
                process.stop(grace=1.0)
                return self._hand_back(None)
            if time.monotonic() >= next_flush:
                self._flush_and_renew(process)
                next_flush = time.monotonic() + FLUSH_EVERY_S

    def _stopped_with_the_worker(self, process: TrainingProcess, error: dict[str, Any] | None) -> bool:
        """Whether the training process ended because the whole worker is being stopped: a
        SIGTERM or Ctrl-C sent to all of the worker's processes reaches it too, a moment before
        the shutdown request reaches this loop. Such an end hands the job back; it is no failure."""
        if self.handback_deadline is not None:
            return True
        if error is not None:
            interrupted = str(error.get("message", "")).startswith("KeyboardInterrupt")
        else:
            interrupted = process.exit_code() in (-signal.SIGINT, -signal.SIGTERM)
        if not interrupted:
            return False
        deadline = time.monotonic() + SHUTDOWN_NOTICE_WAIT_S
        while resilience.shutdown_requested_at() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        return resilience.shutdown_requested_at() is not None

    def _notice_shutdown(self, process: TrainingProcess) -> None:
        """Once the worker is asked to shut down: the training process checkpoints and stops (as
        for a pause, the one stop it knows that keeps the job), within most of the grace."""
        asked = resilience.shutdown_requested_at()
        if asked is None or self.handback_deadline is not None:
            return
        grace = self.settings.worker_shutdown_grace_seconds
        self.handback_deadline = asked + grace * CHECKPOINT_SHARE_OF_GRACE
        log.warning("job %s: worker shutting down; checkpointing to hand the job back", self.job_id)
        if self.stop_sent is None:
            process.send({"op": "stop", "reason": "pause"})
            self.stop_sent = "shutdown"

    def _retry_out_of_memory(self, failed: TrainingProcess) -> TrainingProcess | None:
        """The next rung of the out-of-memory ladder: a fresh training process running the job
        from its newest stored checkpoint (or where this run started) with less memory; None when
        the ladder is spent or no process starts. Not a failed attempt."""
        found = oom.next_plan(self.memory, self.effective_hp)
        if found is None:
            return None
        self.memory, text = found
        resume = (
            self.stored_checkpoint if self.stored_checkpoint and self.stored_checkpoint.is_dir() else None
        )
        paths = {
            **self.run_paths,
            "resume_from": str(resume) if resume else self.run_paths.get("resume_from"),
        }
        step = (
            int(resume.name.rsplit("-", 1)[-1])
            if resume
            else (self.plan.resume.step if self.plan.resume else 0)
        )
        data = {
            "code": oom.OUT_OF_MEMORY,
            "micro_batch_size": self.memory.micro_batch,
            "gradient_accumulation_steps": self.memory.accumulation,
            "gradient_checkpointing": self.memory.gradient_checkpointing,
            "resume_step": step,
        }
        where = f"from its checkpoint at step {step}" if step else "from the start"
        self.pending.append(EventRecord(f"{text}, {where}.", level="warn", data=data))
        self._flush()
        failed.stop(grace=2.0)
        failed.log_path.unlink(missing_ok=True)
        if launcher.job_devices(self.plan.spec) > 1:  # a multi-device run retries on as many
            self.process = launcher.spawn_for(self.plan.spec, _child_log_path(self.settings))
        else:
            self.process = TrainingProcess.spawn(_child_log_path(self.settings))
        deadline = time.monotonic() + READY_TIMEOUT_S
        while not self.process.wait_ready(FLUSH_EVERY_S):  # the lease is renewed while it imports
            if not self.process.alive() or time.monotonic() > deadline:
                return None
            self._flush()
        self.process.send(
            {
                "op": "run",
                "spec": oom.retry_spec(self.plan.spec, self.memory, self.effective_hp),
                "paths": paths,
                "models": self.settings.models,
                "models_dir": str(self.settings.models_dir),
                "runner": os.environ.get("TUNEFORGE_TRAINING_RUNNER") or None,
                "options": {"gradient_checkpointing": True} if self.memory.gradient_checkpointing else {},
            }
        )
        self.run_sent_at = time.monotonic()
        self.first_metrics, self.stop_sent = None, None
        return self.process

    def _wait_ready_renewing(self, process: TrainingProcess, timeout: float = READY_TIMEOUT_S) -> bool:
        """The training process (every rank of it) ready, renewing the lease meanwhile: a spare
        still warming up on a loaded machine, or several ranks importing at once, can take longer
        than a lease."""
        deadline = time.monotonic() + timeout
        while not process.wait_ready(FLUSH_EVERY_S):
            if not process.alive() or time.monotonic() > deadline:
                return False
            self._flush()
        return True

    def _restart_ranks(self, failed: TrainingProcess, why: str | None = None) -> TrainingProcess | None:
        """A multi-device run lost a rank (killed, or its host process ended) and torchrun ended
        the rest: the run starts again on as many devices from its newest stored checkpoint (or
        where this run started), at most `launcher.RANK_RESTARTS` times. Not a failed attempt."""
        if self.rank_restarts >= launcher.RANK_RESTARTS:
            return None
        self.rank_restarts += 1
        why = why or describe_exit(failed.exit_code())[1]
        resume = (
            self.stored_checkpoint if self.stored_checkpoint and self.stored_checkpoint.is_dir() else None
        )
        step = (
            int(resume.name.rsplit("-", 1)[-1])
            if resume
            else (self.plan.resume.step if self.plan.resume else 0)
        )
        where = f"from its checkpoint at step {step}" if step else "from the start"
        self.pending.append(
            EventRecord(
                f"A training process of the multi-device run ended ({why}): all ranks stopped; "
                f"restarting on {launcher.job_devices(self.plan.spec)} devices {where}.",
                level="warn",
                data={"code": "rank_lost", "resume_step": step, "restart": self.rank_restarts},
            )
        )
        self._flush()
        failed.stop(grace=2.0)
        failed.log_path.unlink(missing_ok=True)
        if self._ranks_ready(launcher.spawn_for(self.plan.spec, _child_log_path(self.settings))) is None:
            return None
        assert self.process is not None
        self.process.send(
            {
                "op": "run",
                "spec": oom.retry_spec(self.plan.spec, self.memory, self.effective_hp)
                if self.effective_hp
                else self.plan.spec,
                "paths": {
                    **self.run_paths,
                    "resume_from": str(resume) if resume else self.run_paths.get("resume_from"),
                },
                "models": self.settings.models,
                "models_dir": str(self.settings.models_dir),
                "runner": os.environ.get("TUNEFORGE_TRAINING_RUNNER") or None,
                "options": {"gradient_checkpointing": True} if self.memory.gradient_checkpointing else {},
            }
        )
        self.run_sent_at = time.monotonic()
        self.first_metrics = None
        if self.stop_sent == "pause":
            self.process.send({"op": "stop", "reason": "pause"})
        return self.process

    def _ranks_ready(self, process: launcher.DistributedTrainingProcess) -> TrainingProcess | None:
        """Every rank of a multi-device run ready within `distributed_ready_timeout_seconds`. Ranks
        that are not (torchrun's rendezvous stuck, a rank that never connects or never finishes
        its imports, torchrun gone) stop the run, which starts again as after a lost rank, within
        `launcher.RANK_RESTARTS`; past them None, with `ranks_not_ready` saying what was missing."""
        timeout = self.settings.distributed_ready_timeout_seconds
        while True:
            self.process = process
            if self._wait_ready_renewing(process, timeout):
                return process
            missing = process.missing()
            if process.alive():
                why = f"not every rank was ready within {timeout:g} s: {missing}"
            else:
                ended = describe_exit(process.exit_code())[1]
                why = f"torchrun ended ({ended}) before every rank was ready: {missing}"
            if self.rank_restarts >= launcher.RANK_RESTARTS:
                self.ranks_not_ready = f"the multi-device run did not start: {why}"
                return None
            self.rank_restarts += 1
            self.pending.append(
                EventRecord(
                    f"The multi-device run did not start ({why}): all ranks stopped; starting them "
                    f"again on {process.world_size} devices.",
                    level="warn",
                    data={"code": "ranks_not_ready", "restart": self.rank_restarts},
                )
            )
            self._flush()
            log.warning(
                "job %s: multi-device run not ready: %s\n%s",
                self.job_id,
                why,
                "\n".join(process.last_log_lines(40)),
            )
            process.stop(grace=2.0)
            process.log_path.unlink(missing_ok=True)
            process = launcher.spawn_for(self.plan.spec, _child_log_path(self.settings))

    def _hand_back_for_devices(self, needed: int, here: int) -> RunOutcome:
        """A job on more devices than this worker has: back to its queue, not a spent attempt,
        for a worker that has them (after a pause, so a queue without one does not spin)."""
        log.warning("job %s needs %d devices; this worker has %d: handing it back", self.job_id, needed, here)
        text = f"This worker has {here} device(s) and the job asks for {needed}: back in its queue."
        self._write_held(
            lambda session: jobstate.finish_run(
                session,
                self.job_id,
                self.ctx.owner,
                JobStatus.QUEUED,
                [EventRecord(text, level="warn")],
                attempt=Job.attempt - 1,
            ),
            what="handing the job back",
        )
        time.sleep(launcher.HAND_BACK_PAUSE_S)
        enqueue_job(self.job_id, self.plan.queue)
        return RunOutcome.HANDED_BACK

    # --- messages from the training process ----------------------------------------------------

    def _on_start(self, message: dict[str, Any]) -> None:
        total = int(message["total_steps"])
        start = int(message.get("start_step") or 0)
        self.logged_step = max(self.logged_step, start)
        self.params = {
            "trainable_params": int(message["trainable_params"]),
            "total_params": int(message["total_params"]),
        }
        self.progress = {"step": start, "total_steps": total, "epoch": 0.0, "eta_seconds": None}
        if self.plan.logged_step > start:  # progress never goes back to an older checkpoint's step
            self.progress = {**(self.plan.progress or {}), "total_steps": total, "eta_seconds": None}
        self.progress_dirty = True
        hp = message.get("hyperparameters") or {}
        text = f"Training started: {total} steps on {message['num_examples']} examples"
        if start:
            text += f", resuming after step {start}"
        setup = round(time.monotonic() - self.run_sent_at, 3)  # model load, data, trainer
        log.info(
            "job %s: training started by %s in process %s",
            self.job_id,
            self.ctx.owner,
            self.process.pid if self.process else None,
        )
        data = {"hyperparameters": hp, **self.params, "setup_seconds": setup}
        data |= {k: message[k] for k in ("tokenization_cache", "tokenization_cache_entries") if k in message}
        data |= {k: message[k] for k in launcher.START_FIELDS if k in message}  # multi-device runs
        self.effective_hp = hp
        self.pending.append(EventRecord(text + ".", data=data))
        self._flush()
        if self.tokcache is not None:  # what the run tokenized, for the next attempt or job
            self.tokcache.push()

    def _on_metrics(self, message: dict[str, Any]) -> None:
        step = int(message["step"])
        if step <= self.logged_step:
            return  # reported by an earlier attempt: one point per step
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
        self.metrics.step(message)

    def _on_notice(self, message: dict[str, Any]) -> None:
        """Something the run reports that does not stop it (a tracking integration that failed)."""
        data = message.get("data") or {}
        self.pending.append(EventRecord(str(message["message"]), level="warn", data=data, at=utcnow()))

    def _on_checkpoint(self, process: TrainingProcess, message: dict[str, Any]) -> None:
        step = int(message["step"])
        checkpoint_id = new_checkpoint_id()
        key = self._store_checkpoint(checkpoint_id, Path(message["path"]))
        self.stored_checkpoint = Path(message["path"])
        raw = {**self.last_metrics, **(message.get("metrics") or {}), **self._evaluate(step)}
        metrics = {
            "step": step,
            **{name: raw[name] for name in CHECKPOINT_METRICS if raw.get(name) is not None},
        }
        self.pending.append(HeldCheckpoint(checkpoint_id, step, key, metrics))
        self._flush()  # while the database is unreachable the row waits with the events
        process.send({"op": "ack", "step": step})  # its bytes are stored: training may go on

    def _job_evaluation(self) -> JobEvaluation | None:
        spec = JobSpec.model_validate(self.plan.spec).evaluation
        if spec is None:
            return None
        if self.evaluation is None:
            self.evaluation = JobEvaluation(spec, self.settings, self.work / "out", self._grading_tick)
            if self.evaluation.unavailable:
                text = f"Evaluation skipped: {self.evaluation.unavailable}"
                self.pending.append(EventRecord(text, level="warn"))
        return self.evaluation

    def _grading_tick(self) -> None:
        """Between graded items: renew the lease now and then (model graders can be slow)."""
        if time.monotonic() - self.last_tick >= FLUSH_EVERY_S:
            self._flush()
            self.last_tick = time.monotonic()

    def _evaluate(self, step: int) -> dict[str, float]:
        """Grades the answers the training process wrote for `step`: `eval_score` (and
        `base_eval_score`) for the checkpoint's metrics, reported in a metrics event."""
        evaluation = self._job_evaluation()
        scores = evaluation.scores(step) if evaluation is not None else {}
        if "eval_score" in scores and step not in self.evaluated_steps:
            self.evaluated_steps.add(step)
            text = f"Step {step}: {describe(scores)}"
            self.pending.append(EventRecord(text, type="metrics", data={"step": step, **scores}, at=utcnow()))
        return scores

    def _final_evaluation(
        self, message: dict[str, Any]
    ) -> tuple[dict[str, float], tuple[str, str, int, str] | None]:
        """The final step's scores and the per-item results file `(id, key, size, filename)`."""
        step = int(message.get("final_step") or 0)
        scores = self._evaluate(step)
        evaluation = self.evaluation
        results = evaluation.write_results(step) if evaluation is not None else None
        if results is None:
            return scores, None
        file_id = new_file_id()
        key = file_key(file_id)
        return scores, (file_id, key, self.store.put_file(key, results), results.name)

    def _store_checkpoint(self, checkpoint_id: str, path: Path) -> str:
        """Uploads a checkpoint directory: the full trainer state, and the adapter alone beside it
        (what the checkpoint download serves). Returns the adapter's key."""
        keys = CheckpointKeys(self.job_id, checkpoint_id)
        tmp = self.work / "upload"
        self.store.put_file(keys.state, make_tarball(path, tmp / "state.tar.gz"))
        self.store.put_file(keys.adapter, make_tarball(path, tmp / "adapter.tar.gz", adapter_only))
        shutil.rmtree(tmp, ignore_errors=True)
        return keys.adapter

    def _on_result(self, message: dict[str, Any]) -> RunOutcome:
        stopped = message.get("stopped")
        final_step = int(message.get("final_step") or 0)
        progress = {
            "step": final_step,
            "total_steps": int(message.get("total_steps") or 0),
            "epoch": (self.progress or {}).get("epoch"),
            "eta_seconds": 0 if not stopped else None,
        }
        if stopped == "cancel":
            return self._on_cancelled(final_step, progress)
        if stopped == "pause" and self.stop_sent == "shutdown" and not self.requests.pause_requested:
            return self._hand_back(progress)
        if stopped == "pause":
            return self._on_paused(final_step, progress)
        return self._on_succeeded(message, progress)

    def _on_cancelled(self, final_step: int, progress: dict[str, Any]) -> RunOutcome:
        self._finish(
            JobStatus.CANCELLED, [EventRecord(f"Job cancelled at step {final_step}.")], progress=progress
        )
        return RunOutcome.CANCELLED

    def _on_paused(self, final_step: int, progress: dict[str, Any]) -> RunOutcome:
        self._finish(
            JobStatus.PAUSED,
            [EventRecord(f"Job paused at step {final_step}; resume continues from its checkpoint.")],
            progress=progress,
            pause_requested_at=None,
            attempt=Job.attempt - 1,  # a pause is not a failed attempt (max_attempts)
        )
        return RunOutcome.PAUSED

    def _on_succeeded(self, message: dict[str, Any], progress: dict[str, Any]) -> RunOutcome:
        artifacts = self._upload_artifacts(message)
        result_file = self._upload_metrics_csv(message.get("metrics_csv"))
        scores, results_file = self._final_evaluation(message)
        base = self.plan.spec.get("model") or self.plan.model  # a continued job's original base
        name = fine_tuned_model_name(base, self.plan.project_name, self.plan.suffix, self.job_id)
        self._flush()  # the uploads took a while: renew the lease the result write may retry within
        events = [
            EventRecord(
                f"New fine-tuned model created: {name}",
                data={"metrics": {**(message.get("metrics") or {}), **scores}},
            ),
            EventRecord("The job has successfully completed."),
        ]
        self._write_held(
            lambda session: jobstate.record_success(
                session,
                self.job_id,
                self.ctx.owner,
                artifacts=artifacts,
                result_file=result_file,
                more_result_files=[results_file] if results_file else [],
                events=events,
                progress=progress,
                fine_tuned_model=name,
                trained_tokens=int(message.get("trained_tokens") or 0),
                **self.params,
            ),
            what="writing the result",
        )
        return RunOutcome.SUCCEEDED

    def _hand_back(self, progress: dict[str, Any] | None) -> RunOutcome:
        """The worker is shutting down: running -> queued, not a spent attempt, the lease released,
        and the job sent to its queue again; another worker resumes it from its newest checkpoint.
        `progress` is the stopped run's (None when it could not checkpoint in time)."""
        grace = self.settings.worker_shutdown_grace_seconds
        asked = resilience.shutdown_requested_at() or time.monotonic()
        if progress is not None:
            text = (
                f"The worker is shutting down: job handed back at step {progress['step']} with a "
                "checkpoint; another worker resumes it from there."
            )
        else:
            text = (
                f"The worker is shutting down and no checkpoint could be made within {grace:g}s: job "
                "handed back; another worker resumes it from its last checkpoint."
            )
        until = asked + grace - EXIT_MARGIN_S
        values: dict[str, Any] = {"attempt": Job.attempt - 1}  # the worker left; the job did not fail
        if progress or self.progress:
            values["progress"] = progress or self.progress
        self._write_held(
            lambda session: jobstate.finish_run(
                session, self.job_id, self.ctx.owner, JobStatus.QUEUED, [EventRecord(text)], **values
            ),
            what="writing the hand-back",
            until=until,
        )
        try:
            retry_transient(
                lambda: enqueue_job(self.job_id, self.plan.queue), until=until, what="re-sending the job"
            )
        except OutageOutlastedLease:
            log.warning("job %s: broker unreachable; the reconciler re-sends the queued job", self.job_id)
        return RunOutcome.HANDED_BACK

    def _upload_artifacts(self, message: dict[str, Any]) -> list[StoredArtifact]:
        """The run's output directories as `.tar.gz` artifacts."""
        artifacts = []
        for name, field_name in (
            ("adapter", "adapter_dir"),
            ("model", "model_dir"),
            ("merged", "merged_dir"),
            ("gguf", "gguf_dir"),
            ("tensorboard", "tensorboard_dir"),
        ):
            source = message.get(field_name)
            if source:
                archive = make_tarball(Path(source), self.work / "artifacts" / f"{name}.tar.gz")
                key = artifact_key(self.job_id, name)
                size, digest = upload(self.store, key, archive)
                artifacts.append(StoredArtifact(name, key, size, digest, TARBALL))
                archive.unlink()
        return artifacts

    def _upload_metrics_csv(self, path: str | None) -> tuple[str, str, int] | None:
        """The per-step metrics CSV as a results file: (file id, storage key, size)."""
        if not path or not Path(path).is_file():
            return None
        file_id = new_file_id()
        key = file_key(file_id)
        return file_id, key, self.store.put_file(key, Path(path))

    # --- reporting -----------------------------------------------------------------------------

    def _finish(self, target: JobStatus, events: list[EventRecord], **values: Any) -> None:
        """Writes what is pending, then running -> `target` with its events."""
        self._write_held(
            lambda session: jobstate.finish_run(
                session, self.job_id, self.ctx.owner, target, events, **values
            ),
            what=f"writing the {target.value} status",
        )

    def _write_held(self, final: Callable[[Session], bool], *, what: str, until: float | None = None) -> None:
        """Writes what is held, then `final` (a status change; False: the lease is gone) in the
        same transaction, retrying while the database is unreachable until `until` (default:
        when the lease would run out)."""
        retry_transient(
            lambda: self._write(final=final),
            until=self.lease.expires_at if until is None else until,
            what=f"job {self.job_id}: {what}",
        )

    def _renew(self, session: Session) -> jobstate.LeaseState:
        state = jobstate.renew_lease(session, self.job_id, self.ctx.owner, self.settings.lease_seconds)
        if not state.held:
            raise LeaseLost
        return state

    def _write(
        self, *, renew: bool = False, final: Callable[[Session], bool] | None = None
    ) -> jobstate.LeaseState | None:
        """One transaction: the lease renewed (`renew`), the held events, checkpoint rows and
        progress written, then `final`. What is held is let go only once it has committed."""
        sent_at = time.monotonic()
        state = None
        pruned: list[str] = []
        with session_scope(self.ctx.sessions) as session:
            if renew:
                state = self._renew(session)
            events: list[EventRecord] = []
            for item in self.pending:
                if isinstance(item, EventRecord):
                    events.append(item)
                    continue
                jobstate.append_events(session, self.job_id, events)
                events = []
                pruned += jobstate.record_checkpoint(
                    session, self.job_id, **item._asdict(), keep=self.settings.keep_checkpoints
                )
            jobstate.append_events(session, self.job_id, events)
            if self.progress_dirty:
                jobstate.update_running(
                    session, self.job_id, self.ctx.owner, progress=self.progress, **self.params
                )
            if final is not None and not final(session):
                raise LeaseLost
        if renew:
            self.lease.renewed(sent_at)
        self.outage.recovered(len(self.pending))
        self.pending = []
        self.progress_dirty = False
        for old_key in pruned:
            self.store.delete_prefix(CheckpointKeys.parse(old_key).prefix)
        return state

    def _flush(self) -> jobstate.LeaseState | None:
        """Renews the lease and writes what is held. None while the database is unreachable:
        everything stays held and training goes on, until the outage outlasts the lease
        (`OutageOutlastedLease`)."""
        now = time.monotonic()
        if not self.outage.due(now):
            self.outage.check_lease(now)
            return None
        try:
            state = self._write(renew=True)
        except Exception as error:
            if not is_transient(error):
                raise
            self.outage.failed(error, now)
            self.metrics.renewed(False)
            return None
        self.metrics.renewed(True)
        return state

    def _flush_and_renew(self, process: TrainingProcess) -> None:
        state = self._flush()
        if state is None:
            return
        self.requests = state
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
        detail: str = "",
    ) -> RunOutcome:
        """Fails the job. The tenant sees `code` and a short message naming an incident; the
        details (`detail`, such as a traceback, and the training log's last lines) go to this
        worker's log under that incident (tuneforge/worker/incidents.py). Called while handling
        an exception, its traceback is the detail, and a full disk (ENOSPC: a download, an
        archive, an upload) fails the job as `disk_full` rather than as an internal error."""
        handled = sys.exc_info()[1]  # called from an `except`: the error that ends the run
        if handled is not None:
            detail = detail or traceback.format_exc()
            if code == incidents.INTERNAL_ERROR and incidents.is_disk_full(handled):
                code = incidents.DISK_FULL
        tail = process.last_log_lines(20) if process is not None else []
        failure = incidents.report(self.job_id, code, message, detail=detail, log_tail=tail)
        message = failure.message
        events = [EventRecord(f"Fine-tuning job failed: {message}", level="error", data=failure.data)]

        def failed(session: Session) -> bool:
            jobstate.finish_run(
                session,
                self.job_id,
                self.ctx.owner,
                JobStatus.FAILED,
                events,
                error={"code": code, "message": message, "param": None},
            )
            return True  # a lease already lost leaves nothing to fail

        try:
            try:
                self._write_held(failed, what="writing the failure")
            except Exception as error:
                if isinstance(error, OutageOutlastedLease) or is_transient(error):
                    raise
                log.exception("job %s: held reports could not be written; dropping them", self.job_id)
                self.pending, self.progress_dirty = [], False
                self._write_held(failed, what="writing the failure")
        except OutageOutlastedLease as error:
            log.warning("job %s: the failure could not be recorded (%s)", self.job_id, error)
            return RunOutcome.LEASE_LOST
        return RunOutcome.FAILED
