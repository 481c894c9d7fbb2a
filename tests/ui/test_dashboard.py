"""The dashboard in real Chromium, against a real API and embedded worker that really train.

The tests run in file order and share one stack: job A is created from the form (after its
estimate shows) and watched while it trains; job B, whose suffix is HTML, is cancelled from its
page while A runs; A's adapter is then downloaded. With UI_SCREENSHOT_DIR set (`make screenshots`)
the new-job form and A's page are saved there as PNGs.
"""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from .conftest import Dashboard

pytestmark = pytest.mark.slow

XSS = "<img src=x onerror=alert(1)>"
# Long enough that the page sees the curve grow between its refreshes (events flush every second).
TRAIN_STEPS = 24
TIMEOUT_MS = 60_000
state: dict[str, Any] = {}


@pytest.fixture
def page(browser: Any, dashboard: Dashboard) -> Iterator[Any]:
    """A tab already signed in with the project key (sessionStorage, as the sign-in form leaves
    it); fails the test on any page error, console error (CSP violations included) or dialog."""
    context = browser.new_context(viewport={"width": 1280, "height": 800}, accept_downloads=True)
    context.add_init_script(f"sessionStorage.setItem('tuneforge.key', {dashboard.key!r});")
    tab = context.new_page()
    problems: list[str] = []
    tab.on("pageerror", lambda error: problems.append(f"page error: {error}"))
    tab.on(
        "console", lambda msg: _console_error(msg.type, msg.text) and problems.append(f"console: {msg.text}")
    )
    tab.on("dialog", lambda dialog: (problems.append(f"dialog: {dialog.message}"), dialog.dismiss()))
    tab.set_default_timeout(TIMEOUT_MS)
    yield tab
    context.close()
    assert not problems, problems


def _console_error(kind: str, text: str) -> bool:
    """An error in the console other than Chromium's note of an HTTP error answer (the 400s and
    403s the page asks for and shows on purpose)."""
    return kind == "error" and not text.startswith("Failed to load resource")


def shoot(tab: Any, name: str) -> None:
    if target := os.environ.get("UI_SCREENSHOT_DIR"):
        Path(target).mkdir(parents=True, exist_ok=True)
        tab.screenshot(path=str(Path(target) / name), full_page=True)


def test_ui_headers_allow_no_inline_script(dashboard: Dashboard) -> None:
    answer = httpx.get(dashboard.server.base_url + "/ui", follow_redirects=True, timeout=10)
    assert answer.status_code == 200 and "text/html" in answer.headers["content-type"]
    policy = answer.headers["content-security-policy"]
    script_src = next(p for p in policy.split(";") if p.strip().startswith("script-src"))
    assert script_src.split() == ["script-src", "'self'"], policy
    assert "unsafe-inline" not in policy and "unsafe-eval" not in policy
    assert "<script>" not in answer.text  # only external scripts
    api = httpx.get(dashboard.server.base_url + "/healthz", timeout=10)
    assert "content-security-policy" not in api.headers  # set on /ui only


def test_sign_in_with_enter(browser: Any, dashboard: Dashboard) -> None:
    context = browser.new_context(viewport={"width": 1280, "height": 800})
    tab = context.new_page()
    tab.set_default_timeout(TIMEOUT_MS)
    tab.goto(dashboard.url)
    key_input = tab.locator("#api-key")
    assert key_input.get_attribute("type") == "password"
    key_input.fill("tf-not-a-key")
    key_input.press("Enter")
    tab.locator("#sign-in .error").wait_for()
    key_input.fill(dashboard.key)
    key_input.press("Enter")
    tab.locator("h1", has_text="Fine-tuning jobs").wait_for()
    assert dashboard.key not in tab.url
    assert tab.evaluate("sessionStorage.getItem('tuneforge.key')") == dashboard.key
    assert tab.evaluate("localStorage.length") == 0
    assert tab.locator("#nav-admin").is_hidden()  # a project key sees no projects
    tab.click("#sign-out")
    tab.locator("#api-key").wait_for()
    assert tab.evaluate("sessionStorage.getItem('tuneforge.key')") is None

    tab.locator("#api-key").fill(dashboard.admin_key)
    tab.locator("#api-key").press("Enter")
    tab.locator("#nav-admin").click()
    tab.locator("[data-project]", has_text="ui").wait_for()
    context.close()


def test_upload_shows_the_bad_line(page: Any, dashboard: Dashboard, qa_path: Path, tmp_path: Path) -> None:
    lines = qa_path.read_text().splitlines()
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join([lines[0], lines[1], '{"messages": [}', lines[2]]) + "\n")
    page.goto(dashboard.url + "#/files")
    page.set_input_files("#upload-file", str(bad))
    page.click("#upload-form button[type=submit]")
    error = page.locator("#upload-status .error")
    error.wait_for()
    assert "line 3" in error.text_content()

    page.set_input_files("#upload-file", str(qa_path))
    page.click("#upload-form button[type=submit]")
    page.locator("#upload-status .ok").wait_for()
    page.locator("#files-table td", has_text=qa_path.name).wait_for()


def test_create_from_the_form_after_its_estimate_and_watch_the_loss_curve(
    page: Any, dashboard: Dashboard
) -> None:
    page.goto(dashboard.url + "#/new")
    page.locator("#training_file option", has_text="qa.jsonl").first.wait_for(state="attached")
    assert page.locator("#create-job").is_disabled()
    page.fill("#batch_size", "4")
    page.fill("#learning_rate", "0.003")
    page.fill("#max_steps", str(TRAIN_STEPS))
    page.fill("#suffix", "ui-a")
    page.fill("#metadata", "origin=dashboard")
    page.select_option("#hardware", "a100-80gb")
    page.click("#estimate-job")
    # The first estimate of a model builds its skeleton (seconds; more on a busy machine).
    page.locator("#estimate dt", has_text="Memory per device").wait_for(timeout=180_000)
    page.locator(f"#estimate [data-steps='{TRAIN_STEPS}']").wait_for()
    estimate_text = page.locator("#estimate").text_content()
    for shown in ("Trainable parameters", "Steps", "Estimated time", "Advice", "a100-80gb — fits"):
        assert shown in estimate_text
    page.locator("#create-job:enabled").wait_for()
    shoot(page, "ui-new-job.png")
    page.click("#create-job")

    page.wait_for_url("**/ui/#/jobs/ftjob-*")
    job_id = page.url.rsplit("/", 1)[1]
    state["job_a"] = job_id
    job = dashboard.sdk().fine_tuning.jobs.retrieve(job_id)
    assert job.suffix == "ui-a" and job.metadata == {"origin": "dashboard"}
    assert job.method.supervised.hyperparameters.batch_size == 4  # type: ignore[union-attr]

    chart = page.locator("#loss-chart")
    page.wait_for_function(  # validation, the worker's training process and the model load first
        "() => document.querySelector('#job-status [data-status]').dataset.status === 'running'"
        " && Number(document.querySelector('#loss-chart').dataset.points) > 0",
        timeout=300_000,
    )
    first = int(chart.get_attribute("data-points"))
    assert first < TRAIN_STEPS
    page.wait_for_function(f"() => Number(document.querySelector('#loss-chart').dataset.points) > {first}")
    assert page.locator("#loss-chart canvas").count() >= 1
    assert page.locator("#events-table td", has_text="training loss").count() >= 1


def test_cancel_another_job_and_its_html_suffix_is_text(
    page: Any, dashboard: Dashboard, qa_path: Path
) -> None:
    client = dashboard.sdk()
    training = next(f for f in client.files.list().data if f.filename == qa_path.name)
    job = client.fine_tuning.jobs.create(
        model="tuneforge/tiny-chat",
        training_file=training.id,
        suffix=XSS,
        metadata={"note": XSS},
        method={"type": "supervised", "supervised": {"hyperparameters": {"max_steps": 500}}},
    )
    page.goto(dashboard.url + "#/jobs")
    row = page.locator(f"tr[data-job='{job.id}']")
    row.wait_for()
    assert row.locator(".suffix").text_content() == XSS
    page.fill("#filter-metadata", f"note={XSS}")
    page.click("#job-filters button[type=submit]")
    page.wait_for_function("() => document.querySelectorAll('#jobs-table tbody tr').length === 1")
    row.locator("a").click()

    page.locator("#job-spec").wait_for()
    assert XSS in page.locator("#job-spec").text_content()
    page.locator("#cancel-job:enabled").click()
    page.locator("#job-status [data-status='cancelled']").wait_for()
    assert client.fine_tuning.jobs.retrieve(job.id).status == "cancelled"
    assert page.locator("img").count() == 0  # the suffix never became an element


def test_download_the_adapter(page: Any, dashboard: Dashboard, tmp_path: Path) -> None:
    job_id = state.get("job_a")
    if job_id is None:
        pytest.skip("job A was not created")
    page.goto(dashboard.url + f"#/jobs/{job_id}")
    page.locator("#job-status [data-status='succeeded']").wait_for(timeout=600_000)
    row = page.locator("#artifacts-table tr[data-artifact='adapter']")
    row.wait_for()
    page.locator("#checkpoints-table tbody tr").first.wait_for()
    # The status comes from the job's own poll, the points from the event stream: the last point
    # may land a moment after the status reads succeeded.
    page.wait_for_function(
        f"() => Number(document.querySelector('#loss-chart').dataset.points) === {TRAIN_STEPS}"
    )
    shoot(page, "ui-job.png")

    with page.expect_download() as waiting:
        row.locator("button.download-artifact").click()
    path = tmp_path / "adapter.tar.gz"
    waiting.value.save_as(path)
    body = path.read_bytes()
    assert hashlib.sha256(body).hexdigest() == row.locator("td.sha").text_content()
    with tarfile.open(fileobj=io.BytesIO(body), mode="r:gz") as tar:
        assert {"adapter_config.json", "adapter_model.safetensors"} <= set(tar.getnames())


def test_narrow_screen_has_no_sideways_scroll(page: Any, dashboard: Dashboard) -> None:
    page.set_viewport_size({"width": 390, "height": 844})
    views = {
        "#/jobs": "#jobs-table",
        "#/new": "#estimate dl",
        f"#/jobs/{state.get('job_a')}": "#events-table",
    }
    for view, filled in views.items():
        page.goto(dashboard.url + view)
        page.locator(filled).wait_for()
        assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1"), view
