"""Grading a job's evaluation answers in the worker (the training process writes them, see
tuneforge/training/evaluation.py): the mean reward is `eval_score` (`base_eval_score` for the
starting model), and at the end a per-item results file for `result_files[1]`.

Grading happens here rather than in the training process because a grader may call a model
endpoint or start a sandboxed process. It can take a while (model graders), so it calls `tick`
between items: the job run renews its lease there."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tuneforge.config import Settings
from tuneforge.graders import GraderError, GraderRuntime, ensure_runnable, parse_grader, run_grader
from tuneforge.models.spec import EvaluationSpec
from tuneforge.training.evaluation import answers_path, read_answers

log = logging.getLogger(__name__)

RESULTS_FILENAME = "evaluation_results.jsonl"


@dataclass(frozen=True)
class Graded:
    """One answers file, graded."""

    rows: list[dict[str, Any]]  # the answers rows, each with `score` (and `errors` when any)
    mean: float | None  # None when there were no items


class JobEvaluation:
    """The evaluation of one job run: grades answer files as they appear, once each."""

    def __init__(
        self, spec: EvaluationSpec, settings: Settings, out_dir: Path, tick: Callable[[], None]
    ) -> None:
        self.spec = spec
        self.out_dir = out_dir
        self.tick = tick
        self.runtime = GraderRuntime.from_settings(settings)
        self.grader = parse_grader(spec.grader, "evaluation.grader")
        self.unavailable: str | None = None
        try:
            ensure_runnable(self.grader, self.runtime, "evaluation.grader")
        except GraderError as exc:  # the service's settings changed since the job was created
            self.unavailable = exc.message
        self._graded: dict[int | None, Graded] = {}

    def graded(self, step: int | None) -> Graded | None:
        """The answers at `step` (None: the starting model's), graded; None when there are none."""
        if self.unavailable is not None:
            return None
        if step not in self._graded:
            path = answers_path(self.out_dir, step)
            if not path.is_file():
                return None
            self._graded[step] = self._grade(read_answers(path))
        return self._graded[step]

    def _grade(self, rows: list[dict[str, Any]]) -> Graded:
        scored = []
        for row in rows:
            result = run_grader(self.grader, str(row.get("answer") or ""), row.get("item"), self.runtime)
            errors = {k: v for k, v in result["metadata"]["errors"].items() if v}
            scored.append({**row, "score": float(result["reward"]), **({"errors": errors} if errors else {})})
            self.tick()
        mean = sum(r["score"] for r in scored) / len(scored) if scored else None
        return Graded(scored, mean)

    def scores(self, step: int) -> dict[str, float]:
        """`eval_score` at `step` and, with compare_base, `base_eval_score`."""
        scores: dict[str, float] = {}
        graded = self.graded(step)
        if graded is not None and graded.mean is not None:
            scores["eval_score"] = graded.mean
        base = self.graded(None) if self.spec.compare_base else None
        if base is not None and base.mean is not None:
            scores["base_eval_score"] = base.mean
        return scores

    def write_results(self, step: int) -> Path | None:
        """Per item: the prompt, the reference, the fine-tuned and the base answers and their
        scores (JSONL), for the final step; None without answers."""
        graded = self.graded(step)
        if graded is None:
            return None
        base = self.graded(None) if self.spec.compare_base else None
        base_rows = {r["index"]: r for r in base.rows} if base is not None else {}
        path = self.out_dir / RESULTS_FILENAME
        with path.open("w") as handle:
            for row in graded.rows:
                line: dict[str, Any] = {
                    "index": row["index"],
                    "prompt": row["prompt"],
                    "reference": row["reference"],
                    "fine_tuned_answer": row["answer"],
                    "fine_tuned_score": row["score"],
                }
                if row.get("errors"):
                    line["fine_tuned_errors"] = row["errors"]
                if row["index"] in base_rows:
                    line["base_answer"] = base_rows[row["index"]]["answer"]
                    line["base_score"] = base_rows[row["index"]]["score"]
                handle.write(json.dumps(line, ensure_ascii=False) + "\n")
        return path


def describe(scores: dict[str, float]) -> str:
    parts = [f"eval_score={scores['eval_score']:.4f}"] if "eval_score" in scores else []
    if "base_eval_score" in scores:
        parts.append(f"base_eval_score={scores['base_eval_score']:.4f}")
    return ", ".join(parts)
