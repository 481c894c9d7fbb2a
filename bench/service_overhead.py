"""Service overhead of job execution: the same supervised LoRA spec on tiny-chat run

  (a) directly: `python -m tuneforge.training SPEC.json --out DIR` (a fresh interpreter), and
  (b) through the service: openai SDK -> `tuneforge serve` -> Redis -> `tuneforge worker` ->
      training process -> adapter stored (PostgreSQL, Redis, filesystem store or moto S3),

in one run, and prints the wall-time ratio (b)/(a) plus the time from submit to the first training
step with an idle worker, model loading excluded (the worker reports the training process's
setup time: model load, data, trainer).

    .venv/bin/python bench/service_overhead.py [--steps 40] [--repeats 2] [--s3]

Run from the repository root. Needs PostgreSQL on 127.0.0.1:5432 (user postgres) and
`redis-server` on PATH; the stack (a throwaway database, a private Redis, serve, one worker) is
bench/stack.py's.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.stack import BenchStack  # noqa: E402


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

    from sqlalchemy import select

    from tuneforge.models.job import Job, JobEvent

    data = REPO / "tests" / "data" / "qa.jsonl"
    with BenchStack("bench-overhead", workers=1, s3=args.s3) as stack:
        tmp, env, engine = stack.tmp, stack.env, stack.engine()
        client = stack.sdk()
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
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
