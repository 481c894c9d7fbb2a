"""Queue throughput: N one-step supervised LoRA jobs on tiny-chat submitted at once (openai SDK,
8 client threads) to `tuneforge serve`, run by W separate `tuneforge worker` processes over Redis
and PostgreSQL. Checks that every job succeeds, none is lost and none runs twice (attempt 1 and
exactly one "job started" event each), and prints jobs per minute and the machine's busy CPU.
Training processes are forks of each worker's fork server; `--baseline` first runs a round with
fresh interpreters (TUNEFORGE_WORKER_FORK_SERVER=false) and prints the ratios.

    .venv/bin/python bench/queue_throughput.py [--jobs 100] [--workers 2] [--baseline]

Run from the repository root. Needs PostgreSQL on 127.0.0.1:5432 (user postgres) and
`redis-server` on PATH; the stack (a throwaway database, a private Redis, serve, workers) is
bench/stack.py's.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.stack import BenchStack  # noqa: E402


def busy_cpu_seconds() -> float:
    """The machine's busy CPU time so far (all processes, from /proc/stat; idle and iowait left out)."""
    with open("/proc/stat") as stat:
        fields = [int(v) for v in stat.readline().split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq, steal = fields[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def run_round(jobs: int, workers: int, fork_server: bool) -> dict[str, Any]:
    """One stack, `jobs` jobs; the measures of the round."""
    from sqlalchemy import func, select

    from tuneforge.models.job import Job, JobEvent

    data = REPO / "tests" / "data" / "qa.jsonl"
    env = {"OMP_NUM_THREADS": "1", "TUNEFORGE_WORKER_FORK_SERVER": str(fork_server).lower()}
    with BenchStack("bench-queue", workers=workers, env=env) as stack:
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

        cpu_before = busy_cpu_seconds()
        started = time.perf_counter()
        with ThreadPoolExecutor(8) as pool:
            ids = list(pool.map(submit, range(jobs)))
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
        cpu = busy_cpu_seconds() - cpu_before
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
    return {
        "counts": counts,
        "lost": len(lost),
        "twice": len(twice),
        "submitted": submitted,
        "elapsed": elapsed,
        "cpu": cpu,
        "ok": not lost and not twice and counts.get("succeeded") == len(ids),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument(
        "--baseline",
        action="store_true",
        help="first a round with fresh interpreters per training process (no fork server), then one "
        "with the fork server, and their ratios",
    )
    args = parser.parse_args()
    rounds = {"fresh interpreters": False, "fork server": True} if args.baseline else {"fork server": True}
    results = {name: run_round(args.jobs, args.workers, fork) for name, fork in rounds.items()}

    print()
    print("| measure | " + " | ".join(results) + " |")
    print("| --- |" + " --- |" * len(results))

    def row(measure: str, show: Any) -> None:
        print(f"| {measure} | " + " | ".join(show(r) for r in results.values()) + " |")

    row("jobs / workers", lambda r: f"{args.jobs} / {args.workers}")
    row("statuses", lambda r: str(r["counts"]))
    row("lost / run more than once", lambda r: f"{r['lost']} / {r['twice']}")
    row("submit of all jobs (8 client threads)", lambda r: f"{r['submitted']:.1f} s")
    row("first submit -> last job finished", lambda r: f"{r['elapsed']:.1f} s")
    row("**throughput**", lambda r: f"**{args.jobs / r['elapsed'] * 60:.1f} jobs/min**")
    row("per job per worker", lambda r: f"{r['elapsed'] * args.workers / args.jobs:.2f} s")
    row("machine CPU, busy (/proc/stat)", lambda r: f"{r['cpu']:.0f} CPU-s")
    if args.baseline:
        fresh, forked = results["fresh interpreters"], results["fork server"]
        print()
        print(
            f"throughput ratio fork server / fresh: {fresh['elapsed'] / forked['elapsed']:.2f}x; "
            f"CPU ratio: {forked['cpu'] / fresh['cpu']:.2f}"
        )
    return 0 if all(r["ok"] for r in results.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
