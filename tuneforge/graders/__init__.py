"""OpenAI's graders: validate a grader (`parse_grader`) and score one model sample against one
dataset item (`run_grader`), for the API's graders routes and for evaluations in the worker. No
database; what a grader may use beyond computation is a `GraderRuntime`: a sandboxed process for
`python` graders (tuneforge/graders/sandbox.py), an OpenAI-compatible chat endpoint for model
graders (tuneforge/graders/model.py)."""

from tuneforge.graders.run import GraderRuntime, GraderUnavailable, ensure_runnable, run_grader
from tuneforge.graders.schema import Grader, GraderError, parse_grader

__all__ = [
    "Grader",
    "GraderError",
    "GraderRuntime",
    "GraderUnavailable",
    "ensure_runnable",
    "parse_grader",
    "run_grader",
]
