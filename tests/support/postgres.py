"""PostgreSQL for tests and benchmarks: throwaway databases on the shared server
(127.0.0.1:5432, user postgres, trust) and throwaway clusters of a test's own (initdb/pg_ctl on a
free port), which a test may restart or whose connections it may drop."""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import stat
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg

from .net import free_port, wait_for
from .procs import REPO

PG_ADMIN_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"


def _libpq(url: str) -> str:
    """psycopg's DSN for a SQLAlchemy URL."""
    return url.replace("postgresql+psycopg://", "postgresql://", 1)


def _with_db(admin_url: str, name: str) -> str:
    return admin_url.rsplit("/", 1)[0] + f"/{name}"


def create_database(prefix: str = "tf_test", admin_url: str = PG_ADMIN_URL) -> tuple[str, str]:
    """Creates a uniquely named database; returns (name, SQLAlchemy URL)."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(_libpq(admin_url), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return name, _with_db(admin_url, name)


def drop_database(name: str, admin_url: str = PG_ADMIN_URL) -> None:
    with psycopg.connect(_libpq(admin_url), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def migrate(url: str) -> None:
    """Builds the schema with the migrations (alembic upgrade head)."""
    from alembic import command
    from alembic.config import Config

    config = Config(str(REPO / "alembic.ini"))
    config.attributes["url"] = url
    command.upgrade(config, "head")


@contextmanager
def pg_database(
    prefix: str = "tf_test", admin_url: str = PG_ADMIN_URL, migrated: bool = True
) -> Iterator[str]:
    """A throwaway database (migrated to head unless `migrated=False`), dropped afterwards."""
    name, url = create_database(prefix, admin_url)
    try:
        if migrated:
            migrate(url)
        yield url
    finally:
        drop_database(name, admin_url)


def terminate_backends(url: str) -> int:
    """pg_terminate_backend of every other connection to the database `url` names; returns how
    many were terminated."""
    dbname = url.rsplit("/", 1)[1].split("?")[0]
    with psycopg.connect(_libpq(url), autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()",
            (dbname,),
        ).fetchall()
    return sum(1 for (ok,) in rows if ok)


def _pg_bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=lambda p: int(p.split("/")[4]))
    if found:
        return found[-1]
    path = shutil.which(name)
    if path is None:
        raise FileNotFoundError(f"{name} not found (looked in /usr/lib/postgresql/*/bin and PATH)")
    return path


class PgCluster:
    """A PostgreSQL cluster of a test's own: `initdb` into `directory` (default: a new temporary
    directory, removed on exit), served on a free port with its socket in the same directory.
    As root, every command runs as user postgres, `directory` is owned by postgres and its
    parents are made traversable (o+x) for that user.

        with PgCluster(tmp_path / "pg") as cluster:
            url = cluster.create_database()  # or cluster.url("postgres")
            cluster.restart()                # fast stop, then start
            cluster.terminate_backends(url)
    """

    def __init__(self, directory: Path | None = None, port: int | None = None) -> None:
        self._owned = directory is None
        if directory is None:
            directory = Path(tempfile.mkdtemp(prefix="tf-pg-")) / "data"
        self.directory = Path(directory)
        self.port = port or free_port()
        self.log = self.directory.parent / f"{self.directory.name}.log"
        self._as_postgres = os.geteuid() == 0

    def _run(self, *args: str, timeout: float = 120) -> None:
        command = list(args)
        if self._as_postgres:
            command = ["runuser", "-u", "postgres", "--", *command]
        result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:
            raise RuntimeError(
                f"{' '.join(command)} failed ({result.returncode}):\n{result.stdout}{result.stderr}"
            )

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{dbname}"

    def init(self) -> PgCluster:
        self.directory.mkdir(parents=True, exist_ok=True)
        if self._as_postgres:
            for parent in self.directory.resolve().parents:
                mode = parent.stat().st_mode
                if not mode & stat.S_IXOTH:
                    parent.chmod(mode | stat.S_IXOTH)
            shutil.chown(self.directory, "postgres", "postgres")
            self.log.touch()
            shutil.chown(self.log, "postgres", "postgres")
        self._run(_pg_bin("initdb"), "-D", str(self.directory), "-A", "trust", "-U", "postgres")
        return self

    def start(self) -> None:
        self._run(
            _pg_bin("pg_ctl"),
            "-D",
            str(self.directory),
            "-l",
            str(self.log),
            "-o",
            f"-p {self.port} -k {self.directory} -c listen_addresses=127.0.0.1",
            "-w",
            "-t",
            "120",
            "start",
        )
        wait_for(self._accepts, 60, f"PostgreSQL on port {self.port}")

    def stop(self) -> None:
        self._run(_pg_bin("pg_ctl"), "-D", str(self.directory), "-m", "fast", "-w", "-t", "120", "stop")

    def restart(self) -> None:
        self.stop()
        self.start()

    def _accepts(self) -> bool:
        try:
            with psycopg.connect(_libpq(self.url()), connect_timeout=2):
                return True
        except psycopg.OperationalError:
            return False

    def create_database(self, prefix: str = "tf_test", migrated: bool = True) -> str:
        """A new database in this cluster (migrated to head unless `migrated=False`); its URL."""
        _, url = create_database(prefix, self.url())
        if migrated:
            migrate(url)
        return url

    def terminate_backends(self, url_or_dbname: str) -> int:
        url = url_or_dbname if "://" in url_or_dbname else self.url(url_or_dbname)
        return terminate_backends(url)

    def __enter__(self) -> PgCluster:
        if not (self.directory / "PG_VERSION").exists():
            self.init()
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(RuntimeError):  # already stopped
            self.stop()
        if self._owned:
            shutil.rmtree(self.directory.parent, ignore_errors=True)
