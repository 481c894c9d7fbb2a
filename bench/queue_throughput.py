"""Queue throughput: N one-step supervised LoRA jobs on tiny-chat submitted at once (openai SDK,
8 client threads) to `tuneforge serve`, run by W separate `tuneforge worker` processes over Redis
and PostgreSQL. Checks that every job succeeds, none is lost and none runs twice (attempt 1 and
exactly one "job started" event each), and prints jobs per minute.

    .venv/bin/python bench/queue_throughput.py [--jobs 100] [--workers 2]

Needs PostgreSQL on 127.0.0.1:5432 (user postgres) and Redis on 127.0.0.1:6379 (uses db 6).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

PG_ADMIN = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    import httpx
    import redis
    from openai import OpenAI
    from sqlalchemy import func, select, text

    from tuneforge.db import make_engine
    from tuneforge.models.job import Job, JobEvent

    tmp = Path(tempfile.mkdtemp(prefix="tf-bench-queue-"))
    data = REPO / "tests" / "data" / "qa.jsonl"
    db_name = f"tf_bench_{uuid.uuid4().hex[:8]}"
    admin = make_engine(PG_ADMIN, pool_size=1, max_overflow=0).execution_options(isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{db_name}"'))
    db_url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{db_name}"
    broker = "redis://127.0.0.1:6379/6"
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
            "OMP_NUM_THREADS": "1",
        }
    )
    cli = [sys.executable, "-m", "tuneforge.cli"]
    subprocess.run([*cli, "migrate"], env=env, check=True, cwd=REPO, capture_output=True)
    subprocess.run(
        [*cli, "models", "path", "tuneforge/tiny-chat"], env=env, check=True, cwd=REPO, capture_output=True
    )
    procs = []
    for name, command in [("serve", ["serve", "--port", str(port)])] + [
        (f"worker{i}", ["worker", "--queues", "gpu"]) for i in range(args.workers)
    ]:
        with (tmp / f"{name}.log").open("wb") as log:
            procs.append(
                subprocess.Popen(
                    [*cli, *command],
                    env=env,
                    cwd=REPO,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
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
        time.sleep(15)  # idle workers with their training processes warm

        def submit(_: int) -> str:
            return client.fine_tuning.jobs.create(
                model="tuneforge/tiny-chat",
                training_file=file_id,
                method={
                    "type": "supervised",
                    "supervised": {"hyperparameters": {"max_steps": 1, "batch_size": 4}},
                },  # type: ignore[typeddict-item]
            ).id

        started = time.perf_counter()
        with ThreadPoolExecutor(8) as pool:
            ids = list(pool.map(submit, range(args.jobs)))
        submitted = time.perf_counter() - started
        print(f"{len(ids)} jobs submitted in {submitted:.1f} s; waiting ...", flush=True)
        while True:
            with engine.connect() as conn:
                counts = dict(conn.execute(select(Job.status, func.count()).group_by(Job.status)).all())  # type: ignore[arg-type]
            done = sum(counts.get(s, 0) for s in ("succeeded", "failed", "cancelled"))
            if done >= len(ids):
                break
            time.sleep(1)
        elapsed = time.perf_counter() - started
        with engine.connect() as conn:
            attempts = dict(conn.execute(select(Job.id, Job.attempt)).all())  # type: ignore[arg-type]
            starts = dict(
                conn.execute(  # type: ignore[arg-type]
                    select(JobEvent.job_id, func.count())
                    .where(JobEvent.message.like("Fine-tuning job started%"))
                    .group_by(JobEvent.job_id)
                ).all()
            )
        lost = [i for i in ids if i not in attempts]
        twice = [i for i in ids if attempts.get(i) != 1 or starts.get(i) != 1]
        print()
        print("| measure | value |")
        print("| --- | --- |")
        print(f"| jobs / workers | {len(ids)} / {args.workers} |")
        print(f"| statuses | {counts} |")
        print(f"| lost / run more than once | {len(lost)} / {len(twice)} |")
        print(f"| submit of all jobs (8 client threads) | {submitted:.1f} s |")
        print(f"| first submit -> last job finished | {elapsed:.1f} s |")
        print(f"| **throughput** | **{len(ids) / elapsed * 60:.1f} jobs/min** |")
        print(f"| per job per worker | {elapsed * args.workers / len(ids):.2f} s |")
        return 0 if not lost and not twice and counts.get("succeeded") == len(ids) else 1
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


if __name__ == "__main__":
    raise SystemExit(main())
