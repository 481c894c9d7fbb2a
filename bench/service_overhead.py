"""Service overhead of job execution: the same supervised LoRA spec on tiny-chat run

  (a) directly: `python -m tuneforge.training SPEC.json --out DIR` (a fresh interpreter), and
  (b) through the service: openai SDK -> `tuneforge serve` -> Redis -> `tuneforge worker` ->
      training process -> adapter stored (PostgreSQL, Redis, filesystem store or moto S3),

in one run, and prints the wall-time ratio (b)/(a) plus the time from submit to the first training
step with an idle worker, model loading excluded (the worker reports the training process's
setup time: model load, data, trainer).

    .venv/bin/python bench/service_overhead.py [--steps 40] [--repeats 2] [--s3]

Needs PostgreSQL on 127.0.0.1:5432 (user postgres) and Redis on 127.0.0.1:6379 (uses db 7).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PG_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def hyperparameters(steps: int) -> dict[str, Any]:
    return {
        "max_steps": steps,
        "batch_size": 8,
        "learning_rate": 3e-3,
        "save_every_steps": max(1, steps // 4),
    }


def run_direct(tmp: Path, data: Path, steps: int, env: dict[str, str]) -> float:
    spec = {
        "model": "tuneforge/tiny-chat",
        "training_file": str(data),
        "seed": 3,
        "method": {"type": "supervised", "supervised": {"hyperparameters": hyperparameters(steps)}},
    }
    spec_path = tmp / "direct-spec.json"
    spec_path.write_text(json.dumps(spec))
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "tuneforge.training", str(spec_path), "--out", str(tmp / "direct-out")],
        env=env,
        check=True,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--steps", type=int, default=40, help="optimizer steps (about a minute on 2 CPU cores)"
    )
    parser.add_argument("--repeats", type=int, default=2, help="rounds of (direct, service); best of each")
    parser.add_argument(
        "--s3", action="store_true", help="store objects in moto's S3 server instead of files"
    )
    args = parser.parse_args()

    import httpx
    import redis
    from openai import OpenAI
    from sqlalchemy import select, text

    from tuneforge.db import make_engine
    from tuneforge.models.job import Job, JobEvent

    tmp = Path(tempfile.mkdtemp(prefix="tf-bench-overhead-"))
    data = REPO / "tests" / "data" / "qa.jsonl"
    db_name = f"tf_bench_{uuid.uuid4().hex[:8]}"
    admin = make_engine(PG_ADMIN, pool_size=1, max_overflow=0).execution_options(isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{db_name}"'))
    db_url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{db_name}"
    broker = "redis://127.0.0.1:6379/7"
    redis.Redis.from_url(broker).flushdb()
    port = free_port()
    key = "tf-bench-" + uuid.uuid4().hex
    env = {k: v for k, v in os.environ.items() if not k.startswith("TUNEFORGE_")}
    env.update(
        {
            "TUNEFORGE_DATA_DIR": str(tmp / "data"),
            "TUNEFORGE_MODELS_DIR": str(tmp / "models"),
            "TUNEFORGE_DATABASE_URL": db_url,
            "TUNEFORGE_BROKER_URL": broker,
            "TUNEFORGE_STORAGE_URL": f"file://{tmp / 'objects'}",
            "TUNEFORGE_ADMIN_KEY": key,
            "HF_HUB_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }
    )
    moto = None
    if args.s3:
        from moto.server import ThreadedMotoServer

        from tuneforge.storage.s3 import S3Store

        env.update(
            {
                "AWS_ACCESS_KEY_ID": "bench",
                "AWS_SECRET_ACCESS_KEY": "bench",
                "AWS_DEFAULT_REGION": "us-east-1",
            }
        )
        os.environ.update(
            {k: env[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
        )
        moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        moto.start()
        host, moto_port = moto.get_host_and_port()
        endpoint = f"http://{host}:{moto_port}"
        S3Store("tf-bench", endpoint_url=endpoint, create_bucket=True)
        env.update({"TUNEFORGE_STORAGE_URL": "s3://tf-bench/objects", "TUNEFORGE_S3_ENDPOINT_URL": endpoint})

    cli = [sys.executable, "-m", "tuneforge.cli"]
    subprocess.run([*cli, "migrate"], env=env, check=True, cwd=REPO, capture_output=True)
    subprocess.run(
        [*cli, "models", "path", "tuneforge/tiny-chat"], env=env, check=True, cwd=REPO, capture_output=True
    )
    logs = (tmp / "serve.log").open("wb"), (tmp / "worker.log").open("wb")
    procs = [
        subprocess.Popen(
            [*cli, "serve", "--port", str(port)],
            env=env,
            cwd=REPO,
            stdout=logs[0],
            stderr=subprocess.STDOUT,
            start_new_session=True,
        ),
        subprocess.Popen(
            [*cli, "worker", "--queues", "gpu"],
            env=env,
            cwd=REPO,
            stdout=logs[1],
            stderr=subprocess.STDOUT,
            start_new_session=True,
        ),
    ]
    engine = make_engine(db_url, pool_size=1, max_overflow=0)
    try:
        base = f"http://127.0.0.1:{port}"
        for _ in range(300):
            try:
                if httpx.get(base + "/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        client = OpenAI(base_url=base + "/v1", api_key=key, max_retries=2)
        with data.open("rb") as handle:
            file_id = client.files.create(file=(data.name, handle), purpose="fine-tune").id

        def submit(steps: int) -> str:
            job = client.fine_tuning.jobs.create(
                model="tuneforge/tiny-chat",
                training_file=file_id,
                seed=3,
                method={"type": "supervised", "supervised": {"hyperparameters": hyperparameters(steps)}},  # type: ignore[typeddict-item]
            )
            return job.id

        def wait(job_id: str) -> None:
            """Polls gently (1/s) so the client does not load the 2-core machine; the times come
            from the database (created_at, finished_at), not from this loop."""
            while True:
                job = client.fine_tuning.jobs.retrieve(job_id)
                if job.status in ("succeeded", "failed", "cancelled"):
                    assert job.status == "succeeded", job.error
                    return
                time.sleep(1.0)

        def timeline(job_id: str) -> dict[str, float]:
            with engine.connect() as conn:
                job = conn.execute(select(Job.created_at, Job.finished_at).where(Job.id == job_id)).one()
                rows = conn.execute(
                    select(JobEvent.created_at, JobEvent.type, JobEvent.message, JobEvent.data)
                    .where(JobEvent.job_id == job_id)
                    .order_by(JobEvent.seq)
                ).all()
            t0 = job.created_at
            metrics = [r.created_at for r in rows if r.type == "metrics"]
            training = next(r for r in rows if r.message.startswith("Training started"))
            return {
                "total": (job.finished_at - t0).total_seconds(),
                "claimed": (
                    next(r.created_at for r in rows if r.message.startswith("Fine-tuning job started")) - t0
                ).total_seconds(),
                "setup": float(training.data["setup_seconds"]),
                "train_begin": (training.created_at - t0).total_seconds(),
                "first_step": (metrics[0] - t0).total_seconds(),
                "last_step": (metrics[-1] - t0).total_seconds(),
            }

        print(
            "warm-up job (builds caches, leaves an idle worker with a warm training process) ...", flush=True
        )
        wait(submit(1))
        time.sleep(20)  # the next pool process starts its training process; let its imports finish

        directs: list[float] = []
        services: list[dict[str, float]] = []
        for round_ in range(args.repeats):
            print(
                f"round {round_ + 1}: direct run, python -m tuneforge.training ({args.steps} steps) ...",
                flush=True,
            )
            directs.append(run_direct(tmp, data, args.steps, env))
            time.sleep(5)
            print(
                f"round {round_ + 1}: service run, SDK -> API -> Redis -> worker ({args.steps} steps) ...",
                flush=True,
            )
            job_id = submit(args.steps)
            wait(job_id)
            services.append(timeline(job_id))
            time.sleep(20)  # the next pool process warms its training process
        for i, t in enumerate(services, 1):
            print(f"service round {i}: " + ", ".join(f"{k} {v:.2f}s" for k, v in t.items()))
        best = min(services, key=lambda t: t["total"])
        direct = min(directs)
        to_first = best["first_step"]
        print()
        print(
            f"{args.repeats} rounds, best of each side; all direct: {[round(d, 1) for d in directs]} s, "
            f"all service: {[round(t['total'], 1) for t in services]} s"
        )
        setup, first = best["setup"], to_first
        rows = [
            (
                "direct `python -m tuneforge.training`, wall (start, imports, load, train, save)",
                f"{direct:.1f} s",
            ),
            ("through the service: submit -> succeeded, adapter stored", f"{best['total']:.1f} s"),
            ("**ratio service / direct** (goal <= 1.15)", f"**{best['total'] / direct:.3f}**"),
            ("submit -> job claimed by the worker", f"{best['claimed']:.2f} s"),
            (
                "submit -> training begins (after model load, data, trainer set-up)",
                f"{best['train_begin']:.2f} s",
            ),
            ("of which model load + data + trainer set-up in the training process", f"{setup:.2f} s"),
            ("submit -> first training step done", f"{first:.2f} s"),
            ("**submit -> first step, model load excluded** (goal < 2 s)", f"**{first - setup:.2f} s**"),
            ("first step alone (train begin -> first step done)", f"{first - best['train_begin']:.2f} s"),
            (
                "last step -> succeeded (final upload, artifacts, DB)",
                f"{best['total'] - best['last_step']:.2f} s",
            ),
        ]
        print("| measure | value |")
        print("| --- | --- |")
        for label, value in rows:
            print(f"| {label} | {value} |")
        print(f"\nstorage: {'moto S3' if args.s3 else 'filesystem'}; steps: {args.steps}; data: {data.name}")
    finally:
        for proc in procs:
            os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
        engine.dispose()
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{db_name}" WITH (FORCE)'))
        redis.Redis.from_url(broker).flushdb()
        if moto is not None:
            moto.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
