"""A stand-in for the training entry point, for plumbing tests only (claim, lease, flags, events):
it 'trains' by sleeping, reports metrics, writes checkpoints and outputs in the real layout."""

from __future__ import annotations

import csv
import json
import os
import time

from tuneforge.models.spec import JobSpec
from tuneforge.training.interface import RunInfo, RunObserver, RunPaths, RunResult, StepMetrics


def standin_training(spec: JobSpec, paths: RunPaths, observer: RunObserver) -> RunResult:
    total = spec.hyperparameters.max_steps or 10
    save_every = spec.hyperparameters.save_every_steps or max(1, total // 4)
    delay = float(os.environ.get("STANDIN_STEP_SECONDS", "0.05"))
    start = 0
    if paths.resume_from is not None:
        start = json.loads((paths.resume_from / "state.json").read_text())["step"]
    observer.on_start(RunInfo(total, 8, {"n_epochs": 1}, 100, 1000, start_step=start))
    rows = []
    step = start
    stopped = None
    for step in range(start + 1, total + 1):
        time.sleep(delay)
        if step == int(os.environ.get("STANDIN_CRASH_AT", "0")):
            print("about to crash", flush=True)
            raise RuntimeError(f"stand-in crashed at step {step}")
        if step == int(os.environ.get("STANDIN_DIVERGE_AT", "0")):
            from tuneforge.training.callbacks import check_finite

            check_finite(step, {"loss": 0.0, "grad_norm": float("nan")})
        loss = 2.0 / step
        rows.append((step, loss))
        observer.on_metrics(StepMetrics(step, total, step / total, train_loss=loss, tokens_seen=step * 10))
        stop = observer.stop_requested()
        if step % save_every == 0 or step == total or stop:
            if stop:  # a checkpoint too slow for a shutdown's grace period
                time.sleep(float(os.environ.get("STANDIN_STOP_CHECKPOINT_SECONDS", "0")))
            ckpt = paths.out_dir / "checkpoints" / f"checkpoint-{step}"
            ckpt.mkdir(parents=True, exist_ok=True)
            (ckpt / "state.json").write_text(json.dumps({"step": step}))
            (ckpt / "adapter_config.json").write_text("{}")
            if ballast := int(os.environ.get("STANDIN_CHECKPOINT_BYTES", "0")):
                (ckpt / "optimizer.pt").write_bytes(os.urandom(ballast))  # incompressible
            observer.on_checkpoint(step, ckpt, {"train_loss": loss})
        if stop:
            stopped = stop
            break
    adapter = paths.out_dir / "adapter"
    adapter.mkdir(parents=True, exist_ok=True)
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": spec.model}))
    (adapter / "adapter_model.safetensors").write_bytes(b"standin")
    csv_path = paths.out_dir / "metrics.csv"
    with csv_path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["step", "train_loss"])
        writer.writerows(rows)
    return RunResult(
        stopped=stopped,
        final_step=step,
        total_steps=total,
        trained_tokens=step * 10,
        metrics={"train_loss": rows[-1][1] if rows else None},
        adapter_dir=adapter,
        metrics_csv=csv_path,
        last_checkpoint=None,
    )
