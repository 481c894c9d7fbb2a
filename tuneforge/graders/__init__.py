"""OpenAI's graders: validate a grader (`parse_grader`) and score one model sample against one
dataset item (`run_grader`). Pure functions of their input (no database, no HTTP), for the API's
graders routes and for evaluations in the worker."""

from tuneforge.graders.run import GraderUnavailable, ensure_runnable, run_grader
from tuneforge.graders.schema import Grader, GraderError, parse_grader

__all__ = ["Grader", "GraderError", "GraderUnavailable", "ensure_runnable", "parse_grader", "run_grader"]
