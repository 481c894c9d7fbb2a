"""The dashboard's browser tests: Debian's `chromium` driven by Playwright, against `make run`'s
embedded stack (`tuneforge migrate` + `tuneforge serve`: SQLite, filesystem store, embedded worker).

Chromium comes from the distribution (`apt-get install -y chromium`, run here when it is missing
and we are root); Playwright only drives it (`executable_path`), it never downloads a browser.
Without a Chromium that can be installed the tests skip, saying why.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from openai import OpenAI

from tests.support import Server, start_server, stop_server
from tests.support.api import admin_request

BROWSERS = ("chromium", "chromium-browser")


def _find_chromium() -> str | None:
    for name in BROWSERS:
        if path := shutil.which(name):
            return path
    return None


def _install_chromium() -> str:
    """apt-get install -y chromium (after an apt-get update if the first try fails); returns why
    it could not when it could not."""
    if not shutil.which("apt-get"):
        return "there is no apt-get here"
    if os.geteuid() != 0:
        return "installing it needs root (run `apt-get install -y chromium`)"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "--no-install-recommends", "chromium"]
    for attempt in (install, ["apt-get", "update", "-q"], install):
        done = subprocess.run(attempt, env=env, capture_output=True, text=True, timeout=900)
        if attempt is install and done.returncode == 0:
            return ""
    return f"`apt-get install -y chromium` failed: {done.stderr.strip()[-300:]}"


@pytest.fixture(scope="session")
def chromium_executable() -> str:
    path = _find_chromium()
    if path is None:
        why = _install_chromium()
        path = _find_chromium()
        if path is None:
            pytest.skip(f"Chromium is not installed and could not be installed: {why}")
    return path


@pytest.fixture(scope="module")
def browser(chromium_executable: str) -> Iterator[Any]:
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    with sync_api.sync_playwright() as playwright:
        instance = playwright.chromium.launch(executable_path=chromium_executable, args=["--no-sandbox"])
        try:
            yield instance
        finally:
            instance.close()


@dataclass
class Dashboard:
    server: Server
    admin_key: str
    key: str
    project_id: str

    @property
    def url(self) -> str:
        return self.server.base_url + "/ui/"

    def sdk(self) -> OpenAI:
        return OpenAI(base_url=self.server.base_url + "/v1", api_key=self.key, max_retries=2, timeout=60)


@pytest.fixture(scope="module")
def dashboard(tmp_path_factory: pytest.TempPathFactory, tiny_chat_path: Path) -> Iterator[Dashboard]:
    """`make run`'s stack with one project and its key."""
    data_dir = tmp_path_factory.mktemp("ui") / "data"
    server = start_server({}, data_dir)
    try:
        admin_key = (data_dir / "admin_key").read_text().strip()
        project = admin_request(server, "POST", "/v1/admin/projects", admin_key, json={"name": "ui"})
        key = admin_request(server, "POST", f"/v1/admin/projects/{project['id']}/api_keys", admin_key)
        yield Dashboard(server, admin_key, key["value"], project["id"])
    finally:
        stop_server(server)
