"""Multi-device jobs on a real CPU worker: `hardware.count = 2` runs as two gloo processes under
torchrun (TUNEFORGE_WORKER_CPU_PROCESSES lets a CPU worker do that), training tuneforge/tiny-chat
on the Q&A set.

One 2-process job has rank 1 SIGKILLed after its first stored checkpoint: torchrun ends rank 0,
the worker restarts both ranks from that checkpoint, and the job ends as a single-process job on
the same global batch does: its loss curve stays within LOSS_TOLERANCE of the single-process one
at every step (the two runs draw their batches differently: DistributedSampler vs one sampler).
A `full` job with strategy fsdp runs sharded (FSDP2 on the gloo ranks), resumes from a checkpoint
after rank 1's SIGKILL, and writes a whole model that answers like a single-process `full` job's.

The worker runs in a UTS namespace of its own whose host name resolves to nothing: torchrun's
`--standalone` served the ranks' store on `socket.getfqdn()` and, on a CI VM whose name did not
resolve usefully, retried that name for ever before starting any rank (issue 13). A job that times
out shows the training log (torchrun's and every rank's output) beside the worker's."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tuneforge.db import session_scope
from tuneforge.models.job import Job, JobEvent, cancel_job, pause_job, resume_job
from tuneforge.models.job import get_job_any_project as load_job
from tuneforge.worker.forkserver import PROCESS_NAME, RANK_NAME_PREFIX

from .helpers import artifacts, checkpoints, events, metric_steps, seed_job, sender, status
from .procs import REPO, Services, running_services, training_processes, wait_for
from .real_training import REAL_TRAINING_ENV, finished, send_to_queue, starts, training_logs

pytestmark = pytest.mark.slow

JOB_TIMEOUT_S = 300
#: Largest difference allowed between the 2-process and the 1-process training loss at a step,
#: relative to the 1-process loss (measured: under 0.10 on these runs).
LOSS_TOLERANCE = 0.25
STEPS = 6
#: The worker's host name: one that no resolver knows.
UNRESOLVABLE_HOST = "tuneforge-host-that-does-not-resolve"
#: The queue of a second worker whose rank 1 never starts (tests/worker/stuck_rank).
STUCK_RANK_QUEUE = "gpu-stuck-rank"
#: That worker's bound on its ranks getting ready: past rank 0's start on a loaded machine, which
#: with the worker's fork server ready (never_ready waits for it) is torchrun's start and a fork.
STUCK_READY_TIMEOUT_S = 30
#: How long a worker's fork server may take to import the training stack on a loaded machine.
READY_IMPORT_TIMEOUT_S = 300
#: Indices in Services.processes: the worker on the "gpu" queue and the stuck-rank one.
MAIN_WORKER, STUCK_WORKER = 0, 1


@pytest.fixture(scope="module")
def services(
    pg_url: str,
    redis_url: str,
    tmp_path_factory: pytest.TempPathFactory,
    models_dir: Path,
    tiny_chat_path: Path,
) -> Iterator[Services]:
    env = {
        **REAL_TRAINING_ENV,
        "TUNEFORGE_WORKER_CPU_PROCESSES": "true",
        "TUNEFORGE_WORKER_DEVICES": "2",
    }
    with running_services(tmp_path_factory.mktemp("ddp"), pg_url, redis_url, models_dir, env) as svc:
        _worker_on_an_unresolvable_host(svc)
        stuck = Path(__file__).parent / "stuck_rank"
        svc.worker(
            queues=STUCK_RANK_QUEUE,
            extra_env={
                "PYTHONPATH": f"{stuck}{os.pathsep}{svc.env['PYTHONPATH']}",
                "TUNEFORGE_DISTRIBUTED_READY_TIMEOUT_SECONDS": str(STUCK_READY_TIMEOUT_S),
                "TUNEFORGE_WORKER_FORK_SERVER": "true",
            },
        )
        yield svc


@pytest.fixture(scope="module", autouse=True)
def never_ready(services: Services, qa_path: Path) -> str:
    """The stuck-rank worker's job, sent before the module's other tests run: its three starts
    each wait out the readiness bound (a minute and a half in all, nearly idle), so it overlaps
    them (the ranks each test looks at are those of its own worker). Sent once that worker's fork
    server has the training stack imported (its spare training process, a fork, exists), so that
    rank 0 is ready well within the bound however slow the imports are."""
    wait_for(
        lambda: any(p.info.get("name") == PROCESS_NAME.decode() for p in _below(services, STUCK_WORKER)),
        READY_IMPORT_TIMEOUT_S,
        "the stuck-rank worker's spare training process",
        services,
    )
    job_id = _job(services, qa_path, {"count": 2, "strategy": "ddp"})
    send_to_queue(services, job_id, STUCK_RANK_QUEUE)
    return job_id


def _worker_on_an_unresolvable_host(services: Services) -> None:
    """`tuneforge worker` in its own UTS namespace (unshare(1); as root, or in a user namespace of
    its own otherwise) named UNRESOLVABLE_HOST, the module's first process (MAIN_WORKER);
    stopped with the module's other processes."""
    as_root = os.geteuid() == 0
    namespaces = ["unshare", "--uts"] if as_root else ["unshare", "--user", "--map-root-user", "--uts"]
    script = f'hostname {UNRESOLVABLE_HOST} && exec "$0" -m tuneforge.cli worker --queues gpu --concurrency 1'
    log = (services.tmp / "worker-0.log").open("ab")
    process = subprocess.Popen(
        [*namespaces, "sh", "-c", script, sys.executable],
        env={**os.environ, **services.env},
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        cwd=REPO,
        start_new_session=True,
    )
    services.processes.append(process)


def _job(services: Services, data: Path, hardware: dict[str, Any] | None, **extra: Any) -> str:
    hp = {"batch_size": 4, "max_steps": STEPS, "save_every_steps": 2, "n_epochs": 3, "learning_rate": 2e-3}
    body: dict[str, Any] = {"method": {"type": "supervised", "supervised": {"hyperparameters": hp}}, **extra}
    if hardware is not None:
        body["hardware"] = hardware
    return seed_job(services, data, extra=body)


def _finished(services: Services, job_id: str) -> Job:
    return finished(services, job_id, JOB_TIMEOUT_S)


def _losses(rows: list[JobEvent]) -> dict[int, float]:
    return {
        int(e.data["step"]): float(e.data["train_loss"])
        for e in rows
        if e.type == "metrics" and e.data and e.data.get("train_loss") is not None
    }


def _rank(proc: psutil.Process) -> int | None:
    """The rank a process trains as: a forked rank's from its name, a fresh one's from its
    RANK; None for a stand-in (tuneforge/worker/rankproxy.py), which does not train."""
    if _forked(proc):
        return int(proc.info["name"].removeprefix(RANK_NAME_PREFIX))
    if "tuneforge.worker.child" not in (proc.info.get("cmdline") or []):
        return None
    return _rank_env(proc)


def _forked(proc: psutil.Process) -> bool:
    """A rank the worker's fork server forked (named `tf-rank-N`)."""
    return (proc.info.get("name") or "").startswith(RANK_NAME_PREFIX)


def _rank_env(proc: psutil.Process) -> int | None:
    try:
        value = proc.environ().get("RANK")
    except (psutil.Error, OSError):
        return None
    return int(value) if value is not None else None


@pytest.fixture(scope="module")
def single(services: Services, qa_path: Path) -> tuple[Job, list[JobEvent]]:
    job_id = _job(services, qa_path, None)
    sender(services)(job_id)
    return _finished(services, job_id), events(services, job_id)


@pytest.fixture(scope="module")
def two_processes(
    services: Services, qa_path: Path, single: tuple[Job, list[JobEvent]]
) -> tuple[Job, list[JobEvent]]:
    job_id = _job(services, qa_path, {"count": 2, "strategy": "ddp"})
    sender(services)(job_id)
    assert wait_for(
        lambda: bool(checkpoints(services, job_id)), JOB_TIMEOUT_S, job_id, training_logs(services)
    )
    rank_one = [p for p in _ranks(services) if _rank(p) == 1]  # the process that trains, as an OOM kill
    assert len(rank_one) == 1, rank_one
    rank_one[0].kill()
    killed_at = time.monotonic()
    job = _finished(services, job_id)
    print(f"SIGKILL of rank 1 to the job's end: {time.monotonic() - killed_at:.1f}s")
    return job, events(services, job_id)


def test_two_gloo_processes_learn_like_one(
    single: tuple[Job, list[JobEvent]], two_processes: tuple[Job, list[JobEvent]]
) -> None:
    (job, rows), (one, one_rows) = two_processes, single
    assert one.status == "succeeded", one.error
    assert job.status == "succeeded", (job.error, [e.message for e in rows])
    begun = starts(rows)
    assert all(s["world_size"] == 2 and s["strategy"] == "ddp" for s in begun), begun
    assert begun[0]["hyperparameters"]["batch_size"] == 4  # the global batch, 2 per process
    curve, reference = _losses(rows), _losses(one_rows)
    assert sorted(curve) == sorted(reference) == list(range(1, STEPS + 1))
    for step, loss in reference.items():
        assert abs(curve[step] - loss) <= LOSS_TOLERANCE * loss, (step, curve, reference)
    assert curve[STEPS] < curve[1] and reference[STEPS] < reference[1]


def test_sigkill_of_rank_one_resumes_from_the_checkpoint(
    services: Services, two_processes: tuple[Job, list[JobEvent]]
) -> None:
    job, rows = two_processes
    assert job.attempt == 1  # the restart is no failed attempt
    lost = [e for e in rows if e.data and e.data.get("code") == "rank_lost"]
    assert len(lost) == 1 and lost[0].level == "warn", [e.message for e in rows]
    step = lost[0].data["resume_step"]  # type: ignore[index]
    assert step >= 2 and f"from its checkpoint at step {step}" in lost[0].message
    assert f"resuming after step {step}" in [e.message for e in rows if e.message.startswith("Training")][-1]
    # no orphan: the ranks end with the run (the job's status is written a moment before)
    assert wait_for(lambda: not _ranks(services), 20, "no rank")


@pytest.fixture(scope="module")
def single_full(services: Services, qa_path: Path) -> tuple[Job, list[JobEvent]]:
    job_id = _job(services, qa_path, None, adapter={"type": "full"})
    sender(services)(job_id)
    return _finished(services, job_id), events(services, job_id)


def test_full_with_fsdp_on_two_processes(
    services: Services, qa_path: Path, single_full: tuple[Job, list[JobEvent]], tmp_path: Path
) -> None:
    """CPU FSDP2: each rank holds about half the parameters; rank 1's SIGKILL after the first
    checkpoint resumes both ranks from it (full weights and optimizer state, sharded again); the
    final model is written whole, loads with transformers and answers the Q&A set like a
    single-process `full` job's model (its loss there within LOSS_TOLERANCE)."""
    one, one_rows = single_full
    assert one.status == "succeeded", (one.error, [e.message for e in one_rows])
    job_id = _job(services, qa_path, {"count": 2, "strategy": "fsdp"}, adapter={"type": "full"})
    sender(services)(job_id)
    assert wait_for(
        lambda: bool(checkpoints(services, job_id)), JOB_TIMEOUT_S, job_id, training_logs(services)
    )
    # torchrun's own child for rank 1 (its stand-in where the rank is forked, else the rank)
    rank_one = [
        p for p in _ranks(services) if "--socket" in (p.info.get("cmdline") or []) and _rank_env(p) == 1
    ]
    assert len(rank_one) == 1, rank_one
    rank_one[0].kill()
    job = _finished(services, job_id)
    rows = events(services, job_id)
    assert job.status == "succeeded", (job.error, [e.message for e in rows])
    begun = starts(rows)
    assert len(begun) == 2, begun  # the first run and the one resumed after rank 1's loss
    for start in begun:
        assert start["world_size"] == 2 and start["strategy"] == start["strategy_asked"] == "fsdp", start
        local = start["local_params_per_rank"]
        assert len(local) == 2 and sum(local) == start["total_params"], start
        assert all(abs(n - start["total_params"] / 2) <= 0.01 * start["total_params"] for n in local), start
    lost = [e for e in rows if e.data and e.data.get("code") == "rank_lost"]
    assert len(lost) == 1, [e.message for e in rows]
    step = lost[0].data["resume_step"]  # type: ignore[index]
    assert (
        step >= 2
        and f"resuming after step {step}" in [e.message for e in rows if e.message.startswith("Training")][-1]
    )
    assert sorted(_losses(rows)) == list(range(1, STEPS + 1))
    assert _losses(rows)[STEPS] < _losses(rows)[1]
    sharded, whole = (
        _qa_loss(services, job_id, qa_path, tmp_path / "fsdp"),
        _qa_loss(services, one.id, qa_path, tmp_path / "one"),
    )
    assert abs(sharded - whole) <= LOSS_TOLERANCE * whole, (sharded, whole)


def _below(services: Services, worker: int) -> list[psutil.Process]:
    """The training processes of the module's `worker` as they run now (the command line read when
    listed: one that exits meanwhile is not an error)."""
    try:
        below = {p.pid for p in psutil.Process(services.processes[worker].pid).children(recursive=True)}
    except psutil.NoSuchProcess:
        return []
    return [p for p in training_processes() if p.pid in below]


def _ranks(services: Services, worker: int = MAIN_WORKER) -> list[psutil.Process]:
    """The rank processes of the module's `worker`: torchrun's children (fresh ranks or the
    stand-ins of forked ones) and the ranks its fork server forked."""
    return [p for p in _below(services, worker) if "--socket" in (p.info.get("cmdline") or []) or _forked(p)]


def _rank_numbers(services: Services) -> list[int]:
    return sorted(n for n in map(_rank, _ranks(services)) if n is not None)


def test_pause_resume_and_cancel_stop_every_rank(services: Services, qa_path: Path) -> None:
    """A 2-process job paused mid-run ends both ranks with a checkpoint (no orphan), resumes from it
    on two ranks again, and a cancel then ends both ranks too; no attempt is spent, no step repeats."""
    hardware = {"count": 2, "strategy": "ddp"}
    job_id = seed_job(services, qa_path, max_steps=400, save_every=1000, extra={"hardware": hardware})
    send = sender(services)
    send(job_id)
    logs = training_logs(services)
    wait_for(lambda: len(metric_steps(services, job_id)) >= 2, JOB_TIMEOUT_S, "training to start", logs)
    assert _rank_numbers(services) == [0, 1]
    forked = [p for p in _ranks(services) if _forked(p)]
    assert len(forked) == 2, _ranks(services)  # the worker's fork server forked both ranks
    with session_scope(services.sessions) as session:
        pause_job(session, load_job(session, job_id))  # type: ignore[arg-type]
    wait_for(lambda: finished_or(services, job_id, "paused"), 120, "the pause", logs)
    wait_for(lambda: not _ranks(services), 30, "both ranks to end after the pause", logs)
    paused_at = checkpoints(services, job_id)[-1].step_number
    assert 2 <= paused_at < 400

    with session_scope(services.sessions) as session:
        resume_job(session, load_job(session, job_id))  # type: ignore[arg-type]
    send(job_id)
    wait_for(
        lambda: max(metric_steps(services, job_id)) >= paused_at + 2, JOB_TIMEOUT_S, "the resumed run", logs
    )
    assert _rank_numbers(services) == [0, 1]
    with session_scope(services.sessions) as session:
        cancel_job(session, load_job(session, job_id))  # type: ignore[arg-type]
    wait_for(lambda: finished_or(services, job_id, "cancelled"), 120, "the cancel", logs)
    wait_for(lambda: not _ranks(services), 30, "both ranks to end after the cancel", logs)
    job, rows = _finished(services, job_id), events(services, job_id)
    assert job.status == "cancelled" and job.attempt == 1, (job.status, job.error)
    steps = metric_steps(services, job_id)
    assert steps == list(range(1, len(steps) + 1)), steps  # resumed after the paused step, none twice
    begun = starts(rows)
    assert len(begun) == 2 and all(s["world_size"] == 2 for s in begun), begun


def finished_or(services: Services, job_id: str, wanted: str) -> bool:
    """The job reached `wanted`; a job that ended otherwise fails the wait at once."""
    now = status(services, job_id)
    assert now not in {"succeeded", "failed", "cancelled", "paused"} - {wanted}, now
    return now == wanted


def _qa_loss(services: Services, job_id: str, data: Path, into: Path) -> float:
    """The mean loss on the Q&A set's conversations of the job's final model, loaded with
    transformers from its `model` artifact."""
    import json

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tuneforge.worker.packaging import extract_tarball

    stored = artifacts(services, job_id)["model"]
    model_dir = extract_tarball(services.tmp / "objects" / stored.storage_key, into)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    losses = []
    with torch.no_grad():
        for line in data.read_text().splitlines():
            ids: Any = tokenizer.apply_chat_template(
                json.loads(line)["messages"], return_tensors="pt", return_dict=True
            )
            losses.append(float(model(input_ids=ids["input_ids"], labels=ids["input_ids"]).loss))
    return sum(losses) / len(losses)


def test_estimator_shards_full_fine_tuning_and_replicates_adapters() -> None:
    """Per-device memory on 2 devices: FSDP holds about half the weights, gradients and optimizer
    state of one device's full run (plus two gathered layers); DDP holds all of it; each device's
    activations are for its half of the global batch."""
    from tests.estimates.test_estimates import QWEN2_SMALL, _request
    from tuneforge.estimates import estimate

    def memory(adapter: str, **hardware: Any) -> Any:
        request = _request(
            QWEN2_SMALL,
            adapter={"type": adapter},
            hyperparameters={"batch_size": 8},
            hardware={"gpu_memory_gb": 80, **hardware},
        )
        return estimate(request).memory

    one, fsdp, ddp = memory("full"), memory("full", count=2), memory("full", count=2, strategy="ddp")
    assert ddp.optimizer == one.optimizer and ddp.gradients == one.gradients  # a whole replica
    assert fsdp.optimizer == -(-one.optimizer // 2) and fsdp.gradients == -(-one.gradients // 2)
    assert one.weights / 2 < fsdp.weights < one.weights
    assert fsdp.activations == ddp.activations < one.activations  # micro-batch 4 of the 8
    lora_two = memory("lora", count=2)  # auto: ddp for adapters
    assert lora_two.weights == memory("lora").weights


def test_ranks_that_never_get_ready_restart_then_fail_naming_the_missing_rank(
    services: Services, never_ready: str
) -> None:
    """On the second worker rank 1 hangs before connecting: each start ends after the bound with
    a `ranks_not_ready` warning naming it, twice (the lost-rank restarts), then the job fails."""
    job_id = never_ready
    job = _finished(services, job_id)
    rows = events(services, job_id)
    assert job.status == "failed" and job.error is not None, [e.message for e in rows]
    restarts = [e for e in rows if e.data and e.data.get("code") == "ranks_not_ready"]
    assert [e.level for e in restarts] == ["warn", "warn"], [e.message for e in rows]
    missing = f"not every rank was ready within {STUCK_READY_TIMEOUT_S} s: 1 of 2 ranks not ready (ready: [0]"
    assert all(missing in e.message for e in restarts), [e.message for e in restarts]
    assert job.error["message"].startswith(f"the multi-device run did not start: {missing}"), job.error
    assert job.attempt == 1
    assert wait_for(lambda: not _ranks(services, STUCK_WORKER), 20, "no rank")
