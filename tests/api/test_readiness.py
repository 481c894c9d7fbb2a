"""Starting on a database whose schema is not the code's, and what /readyz tells (no key needed):
each check answers only `ok` or `unavailable`; the reasons go to the server's log."""

from __future__ import annotations

import subprocess
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, text

from tests.support import free_port, pg_database, start_server, stop_server, tuneforge_env
from tests.support.api import ADMIN_KEY
from tests.support.server import tuneforge_command
from tuneforge.config import Settings
from tuneforge.db import migrate

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}


def _readiness_values(body: dict[str, object]) -> set[object]:
    checks = body["checks"]
    assert isinstance(checks, dict)
    return {body["status"], *checks.values()}


def test_serve_refuses_an_unmigrated_postgresql_database(tmp_path: Path) -> None:
    with pg_database("tf_unmigrated", migrated=False) as url:
        env = tuneforge_env(
            {
                "TUNEFORGE_DATA_DIR": str(tmp_path),
                "TUNEFORGE_DATABASE_URL": url,
                "TUNEFORGE_ADMIN_KEY": ADMIN_KEY,
            }
        )
        result = subprocess.run(
            [*tuneforge_command(), "serve", "--port", str(free_port())],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert result.returncode == 2, result.stdout + result.stderr
    assert "run `tuneforge migrate`" in result.stderr
    assert "Tuneforge API on" not in result.stdout


def test_serve_migrates_embedded_sqlite_itself(tmp_path: Path, models_dir: Path) -> None:
    server = start_server({"TUNEFORGE_ADMIN_KEY": ADMIN_KEY}, tmp_path / "data", migrate_first=False)
    try:
        created = httpx.post(
            server.base_url + "/v1/admin/projects", json={"name": "p"}, headers=ADMIN, timeout=30
        )
        assert created.status_code == 200, created.text
        ready = httpx.get(server.base_url + "/readyz", timeout=30)
        assert ready.status_code == 200, ready.text
    finally:
        stop_server(server)


def test_readyz_reports_an_outdated_schema_and_a_missing_broker_without_details(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from tuneforge.api.app import create_app

    url = f"sqlite:///{tmp_path / 'tuneforge.db'}"
    migrate(url)
    dead_broker = f"redis://127.0.0.1:{free_port()}/0"
    settings = Settings(data_dir=tmp_path, database_url=url, broker_url=dead_broker, admin_key=ADMIN_KEY)  # type: ignore[arg-type]
    app = create_app(settings)
    with TestClient(app, raise_server_exceptions=False) as client:
        engine = create_engine(url)
        with engine.begin() as connection:
            connection.execute(text("UPDATE alembic_version SET version_num = 'some_old_revision'"))
        engine.dispose()
        ready = client.get("/readyz")
    app.state.engine.dispose()
    assert ready.status_code == 503
    body = ready.json()
    assert body == {
        "status": "unavailable",
        "checks": {"database": "ok", "schema": "unavailable", "store": "ok", "broker": "unavailable"},
    }
    assert _readiness_values(body) <= {"ok", "unavailable"}
    for secret in ("some_old_revision", "127.0.0.1", "redis", "tuneforge migrate"):
        assert secret not in ready.text
    assert "some_old_revision" in caplog.text  # the operator still learns why


def test_app_refuses_to_start_on_an_unmigrated_database(tmp_path: Path) -> None:
    from tuneforge.api.app import create_app
    from tuneforge.db import SchemaOutdated

    url = f"sqlite:///{tmp_path / 'empty.db'}"
    settings = Settings(data_dir=tmp_path, database_url=url, admin_key=ADMIN_KEY)  # type: ignore[arg-type]
    app = create_app(settings)
    with pytest.raises(SchemaOutdated, match="tuneforge migrate"), TestClient(app):
        pass
    app.state.engine.dispose()
