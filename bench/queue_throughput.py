"""Queue throughput: N one-step supervised LoRA jobs on tiny-chat submitted at once (openai SDK,
8 client threads) to `tuneforge serve`, run by W separate `tuneforge worker` processes over Redis
and PostgreSQL. Checks that every job succeeds, none is lost and none runs twice (attempt 1 and
exactly one "job started" event each), and prints jobs per minute.

    .venv/bin/python bench/queue_throughput.py [--jobs 100] [--workers 2]

Run from the repository root. Needs PostgreSQL on 127.0.0.1:5432 (user postgres) and
`redis-server` on PATH; the stack (a throwaway database, a private Redis, serve, workers) is
bench/stack.py's.
"""

from __future__ import annotations

import argparse
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.stack import BenchStack  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    from sqlalchemy import func, select

    from tuneforge.models.job import Job, JobEvent

    data = REPO / "tests" / "data" / "qa.jsonl"
    with BenchStack("bench-queue", workers=args.workers, env={"OMP_NUM_THREADS": "1"}) as stack:
        engine = stack.engine()
        client = stack.sdk()
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


if __name__ == "__main__":
    raise SystemExit(main())
