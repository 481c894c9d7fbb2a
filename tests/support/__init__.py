"""Helpers shared by the tests and the benchmarks: free ports, waiting, process trees,
throwaway PostgreSQL databases and clusters, a private redis-server, `tuneforge serve` processes.

Import from here (`from tests.support import free_port`), never from a conftest. Benchmarks run
from the repository root (`python bench/x.py`) put the root on sys.path first.
"""

from __future__ import annotations

from .net import free_port, wait_for
from .postgres import (
    PG_ADMIN_URL,
    PgCluster,
    create_database,
    drop_database,
    migrate,
    pg_database,
    terminate_backends,
)
from .procs import REPO, kill_tree, stop_process
from .redis_server import RedisServer
from .server import Server, start_server, stop_server, tuneforge_env

__all__ = [
    "PG_ADMIN_URL",
    "REPO",
    "PgCluster",
    "RedisServer",
    "Server",
    "create_database",
    "drop_database",
    "free_port",
    "kill_tree",
    "migrate",
    "pg_database",
    "start_server",
    "stop_process",
    "stop_server",
    "terminate_backends",
    "tuneforge_env",
    "wait_for",
]
