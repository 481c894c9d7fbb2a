"""By hand: `python -m tuneforge.training SPEC.json --out DIR` (debugging, GPU runs).

SPEC.json is a create-job body (as for POST /v1/fine_tuning/jobs) except that `training_file` and
`validation_file` are local paths and `model` is an id on offer or a local model directory.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from tuneforge.training.interface import RunInfo, RunPaths, StepMetrics, StopReason


class PrintingObserver:
    """Prints progress lines to stderr; never asks to stop."""

    def __init__(self) -> None:
        self.started = time.perf_counter()

    def on_start(self, info: RunInfo) -> None:
        print(
            f"training: {info.total_steps} steps, {info.num_examples} examples, "
            f"{info.trainable_params:,}/{info.total_params:,} trainable, from step {info.start_step}",
            file=sys.stderr,
        )

    def on_metrics(self, metrics: StepMetrics) -> None:
        parts = [f"step {metrics.step}/{metrics.total_steps}"]
        if metrics.train_loss is not None:
            parts.append(f"loss {metrics.train_loss:.4f}")
        if metrics.valid_loss is not None:
            parts.append(f"valid_loss {metrics.valid_loss:.4f}")
        if metrics.tokens_per_second:
            parts.append(f"{metrics.tokens_per_second:,.0f} tok/s")
        print("  ".join(parts), file=sys.stderr)

    def on_checkpoint(self, step: int, path: Path, metrics: dict[str, Any]) -> None:
        print(f"checkpoint {path}", file=sys.stderr)

    def stop_requested(self) -> StopReason | None:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tuneforge.training", description=__doc__)
    parser.add_argument("spec", type=Path, help="job spec JSON (create-job body with local file paths)")
    parser.add_argument("--out", type=Path, required=True, help="output directory")
    parser.add_argument("--resume-from", type=Path, default=None, help="a checkpoint directory to resume")
    parser.add_argument("--model-id", default=None, help="id to record for a local model directory")
    args = parser.parse_args(argv)

    from tuneforge.config import get_settings
    from tuneforge.models.spec import JobSpec
    from tuneforge.training.base_models import UnknownModel, resolve_model_path
    from tuneforge.training.data import DataError
    from tuneforge.training.run import run_training

    try:
        spec = JobSpec.model_validate(json.loads(args.spec.read_text()))
    except (OSError, ValueError) as exc:
        parser.error(f"{args.spec}: {exc}")
    model_path = Path(spec.model).expanduser()
    if model_path.is_dir():
        model_dir, model_id = model_path, args.model_id or model_path.name
    else:
        settings = get_settings()
        try:
            model_dir = resolve_model_path(spec.model, settings.models, settings.models_dir)
        except UnknownModel:
            parser.error(f"model {spec.model!r} is neither a model on offer nor a local directory")
        model_id = args.model_id or spec.model
    paths = RunPaths(
        model_dir=model_dir,
        train_file=Path(spec.training_file),
        valid_file=Path(spec.validation_file) if spec.validation_file else None,
        out_dir=args.out,
        resume_from=args.resume_from,
        model_id=model_id,
    )
    if not paths.train_file.is_file():
        parser.error(f"training_file {paths.train_file} is not a file")
    try:
        result = run_training(spec, paths, PrintingObserver())
    except DataError as exc:
        parser.error(str(exc))
    summary = {
        "stopped": result.stopped,
        "final_step": result.final_step,
        "total_steps": result.total_steps,
        "trained_tokens": result.trained_tokens,
        "trainable_params": result.trainable_params,
        "total_params": result.total_params,
        "metrics": result.metrics,
        "warnings": result.warnings,
        "adapter_dir": str(result.adapter_dir) if result.adapter_dir else None,
        "model_dir": str(result.model_dir) if result.model_dir else None,
        "merged_dir": str(result.merged_dir) if result.merged_dir else None,
        "metrics_csv": str(result.metrics_csv) if result.metrics_csv else None,
        "hyperparameters": result.report.get("hyperparameters"),
        "data": result.report.get("data"),
    }
    print(json.dumps(summary, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
