"""An error of the worker's own shows the tenant a code, a generic message and an incident id;
the exception (here one carrying SQL and its parameters) and its traceback go only to the
worker's log under that id. The run happens in-process, with a store that fails on download."""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import pytest

from tuneforge.storage import open_store
from tuneforge.worker.execution import RunOutcome, WorkerContext, run_job

from .helpers import events, get_job, seed_job
from .procs import Services

SECRET_SQL = (
    "UPDATE jobs SET status=%(status)s WHERE jobs.id = %(id_1)s [parameters: {'id_1': 'ftjob-secret'}]"
)


class FailingStore:
    """The module's store, except that every download fails with an error quoting SQL."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner

    def download(self, key: str, path: Path) -> None:
        raise RuntimeError(SECRET_SQL)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def test_an_internal_error_shows_an_incident_not_the_exception(
    services: Services, qa_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = services.settings()
    ctx = WorkerContext(settings, services.sessions, FailingStore(open_store(settings.storage_url)))  # type: ignore[arg-type]
    job_id = seed_job(services, qa_path)
    with caplog.at_level(logging.ERROR, logger="tuneforge.worker.incidents"):
        assert run_job(job_id, ctx) is RunOutcome.FAILED
    job = get_job(services, job_id)
    assert job.error is not None and job.error["code"] == "internal_error"
    match = re.fullmatch(
        r"an internal error stopped the job \(incident (inc-[0-9a-f]{12})\)", job.error["message"]
    )
    assert match, job.error
    incident = match.group(1)
    shown = " ".join(f"{e.message} {e.data}" for e in events(services, job_id))
    assert "UPDATE jobs" not in shown and "ftjob-secret" not in shown and "Traceback" not in shown
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert f"incident {incident}" in logged and SECRET_SQL in logged and "Traceback" in logged
