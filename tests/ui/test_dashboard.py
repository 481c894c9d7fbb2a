"""The dashboard in real Chromium, against a real API and embedded worker that really train.

The tests run in file order and share one stack: job A is created from the form (after its
estimate shows) and watched while it trains; job B, whose suffix is HTML, is cancelled from its
page while A runs; A's adapter (its size and sha256 as listed) and a checkpoint's adapter are then
downloaded, and the jobs list filtered by status and metadata. Job C (an HTML suffix, trained,
validated and evaluated on a file whose name is HTML) is paused and resumed from its page while it
runs, then shows its validation loss, an eval score per checkpoint and an event naming its model;
the models page lists A's and C's models. With UI_SCREENSHOT_DIR set (`make screenshots`) the
new-job form and A's page are saved there as PNGs.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.support.api import admin_request
from tests.support.graders import EXACT

from .conftest import Dashboard

pytestmark = pytest.mark.slow

XSS = "<img src=x onerror=alert(1)>"
HTML_NAME = f"{XSS}.jsonl"
# Long enough that the page sees the curve grow between its refreshes (events flush every second).
TRAIN_STEPS = 24
TIMEOUT_MS = 60_000
# Job C: long enough that a pause clicked after its first step lands before its end; checkpoints
# (each graded) and validation losses every few steps.
C_STEPS = 16
C_HYPERPARAMETERS: dict[str, Any] = {
    "batch_size": 8,
    "learning_rate": 2e-3,
    "lr_scheduler_type": "constant",
    "max_steps": C_STEPS,
    "save_every_steps": 8,
    "eval_every_steps": 4,
}
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


LISTED_JOBS = """() => Object.fromEntries([...document.querySelectorAll('#jobs-table tbody tr')].map(
    (row) => [row.dataset.job, row.querySelector('[data-status]').dataset.status]))"""


def _api(dashboard: Dashboard, path: str) -> Any:
    answer = httpx.get(
        f"{dashboard.server.base_url}/v1{path}",
        headers={"Authorization": f"Bearer {dashboard.key}"},
        timeout=60,
    )
    answer.raise_for_status()
    return answer.json()


def _human_bytes(n: int) -> str:
    """The page's bytes(): B, then KiB, MiB, ... with one decimal."""
    value, unit = float(n), 0
    while value >= 1024 and unit < 4:
        value, unit = value / 1024, unit + 1
    return f"{n} B" if unit == 0 else f"{value:.1f} {['B', 'KiB', 'MiB', 'GiB', 'TiB'][unit]}"


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
    _admin_sees_keys(tab, dashboard)
    context.close()


def _admin_sees_keys(tab: Any, dashboard: Dashboard) -> None:
    """The admin sees the project's key (redacted), makes a second one (shown once, and it works)
    and revokes it (refused at once); the project's own key stays."""
    section = tab.locator(f"section[data-project='{dashboard.project_id}']")
    section.wait_for()
    assert "ui" in section.locator("h2").text_content()
    keys = section.locator("tbody tr[data-key]")
    assert keys.count() == 1
    redacted = keys.first.locator("td").first.text_content()
    assert redacted.endswith("...") and dashboard.key.startswith(redacted.removesuffix("..."))
    assert dashboard.key not in section.text_content()

    section.get_by_role("button", name="New key").click()
    shown = section.locator(".ok code")
    shown.wait_for()
    new_key = shown.text_content()
    assert new_key.startswith("tf-") and new_key != dashboard.key
    assert keys.count() == 2
    models = dashboard.server.base_url + "/v1/models"
    assert httpx.get(models, headers={"Authorization": f"Bearer {new_key}"}, timeout=30).status_code == 200

    listed = admin_request(
        dashboard.server, "GET", f"/v1/admin/projects/{dashboard.project_id}/api_keys", dashboard.admin_key
    )["data"]
    new_id = next(k["id"] for k in listed if new_key.startswith(k["redacted_value"].removesuffix("...")))
    new_row = section.locator(f"tr[data-key='{new_id}']")
    new_row.get_by_role("button", name="Revoke").click()
    section.locator(f"tr[data-key='{new_id}'] button").wait_for(state="detached")
    assert new_row.locator("td").nth(2).text_content()  # the revoked time
    assert httpx.get(models, headers={"Authorization": f"Bearer {new_key}"}, timeout=30).status_code == 401
    assert (
        httpx.get(models, headers={"Authorization": f"Bearer {dashboard.key}"}, timeout=30).status_code == 200
    )


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


def test_a_file_name_with_html_is_text(page: Any, dashboard: Dashboard, qa_path: Path) -> None:
    """The eight-line file a later job trains and evaluates on, named like markup. The page's
    first listing is held until after the upload's own listing has shown the file (as a busy
    server may answer them): its older answer must not replace the newer list (CI once saw the
    file missing after its upload)."""
    head = "".join(qa_path.read_text().splitlines(keepends=True)[:8]).encode()
    held: list[Any] = []

    def hold_first_listing(route: Any) -> None:
        if route.request.method == "GET" and not held:
            held.append(route)
        else:
            route.continue_()

    page.route("**/v1/files", hold_first_listing)
    page.goto(dashboard.url + "#/files")
    before_upload = _api(dashboard, "/files")
    page.set_input_files(
        "#upload-file", files=[{"name": HTML_NAME, "mimeType": "application/jsonl", "buffer": head}]
    )
    page.click("#upload-form button[type=submit]")
    page.locator("#upload-status .ok").wait_for()
    assert HTML_NAME in page.locator("#upload-status .ok").text_content()
    cell = page.locator("#files-table td", has_text=XSS)
    cell.wait_for()
    assert len(held) == 1
    with page.expect_response(lambda answer: answer.request == held[0].request) as first:
        held[0].fulfill(json=before_upload)  # the answer as it was before the upload
    first.value.finished()
    page.wait_for_timeout(500)  # the page's handling of the late answer (a few event-loop turns)
    assert cell.count() == 1, "the older listing replaced the newer one"
    assert cell.text_content() == HTML_NAME
    assert page.locator("img").count() == 0
    uploaded = next(f for f in dashboard.sdk().files.list().data if f.filename == HTML_NAME)
    state["html_file"] = uploaded.id


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
    # The points came over the live event stream (SSE), not the polling fallback.
    assert page.locator("#live-mode").text_content() == "(live)"
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
    state["job_b"] = job.id
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
    listed = {a["name"]: a for a in _api(dashboard, f"/fine_tuning/jobs/{job_id}/artifacts")["data"]}
    assert listed["adapter"]["sha256"] == hashlib.sha256(body).hexdigest()
    size = row.locator("td.size")
    assert listed["adapter"]["bytes"] == len(body)
    assert size.get_attribute("title") == f"{len(body)} bytes"
    assert size.text_content() == _human_bytes(len(body))

    # Every checkpoint with its metrics; the first one's adapter downloads.
    checkpoints = _api(dashboard, f"/fine_tuning/jobs/{job_id}/checkpoints?limit=100")["data"]
    assert checkpoints
    page.wait_for_function(
        "(n) => document.querySelectorAll('#checkpoints-table tr[data-checkpoint]').length === n",
        arg=len(checkpoints),
    )
    for checkpoint in checkpoints:
        shown = page.locator(f"#checkpoints-table tr[data-checkpoint='{checkpoint['id']}'] td").nth(2)
        text = shown.text_content()
        assert "train_loss = " in text
        for name in checkpoint["metrics"]:
            assert f"{name} = " in text, (name, text)
    first = min(checkpoints, key=lambda c: c["step_number"])
    with page.expect_download() as waiting:
        page.locator(f"#checkpoints-table tr[data-checkpoint='{first['id']}'] button").click()
    assert waiting.value.suggested_filename == f"{first['id']}-adapter.tar.gz"
    path = tmp_path / "checkpoint.tar.gz"
    waiting.value.save_as(path)
    with tarfile.open(path, mode="r:gz") as tar:
        assert "adapter_config.json" in tar.getnames()


def test_filter_jobs_by_status_and_metadata(page: Any, dashboard: Dashboard) -> None:
    job_a, job_b = state.get("job_a"), state.get("job_b")
    if job_a is None or job_b is None:
        pytest.skip("jobs A and B were not created")
    page.goto(dashboard.url + "#/jobs")
    page.locator(f"tr[data-job='{job_a}']").wait_for()
    page.locator(f"tr[data-job='{job_b}']").wait_for()
    # A's row: full id (its link), status, model and fine-tuned model, method, adapter, a full
    # progress bar, created and finished
    model = dashboard.sdk().fine_tuning.jobs.retrieve(job_a).fine_tuned_model
    cells = page.locator(f"tr[data-job='{job_a}'] td")
    assert cells.nth(0).locator("a").text_content() == job_a
    assert cells.nth(0).locator("a").get_attribute("href") == f"#/jobs/{job_a}"
    assert cells.nth(1).text_content() == "succeeded"
    assert cells.nth(2).text_content() == f"tuneforge/tiny-chat{model}"
    assert [cells.nth(i).text_content() for i in (3, 4)] == ["supervised", "lora r=16"]
    bar = cells.nth(5).locator("progress")
    assert bar.get_attribute("value") == bar.get_attribute("max") == str(TRAIN_STEPS)
    assert cells.nth(5).text_content().startswith(f"step {TRAIN_STEPS}/{TRAIN_STEPS}")
    for i in (6, 7):
        assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ", cells.nth(i).text_content())

    def shown() -> dict[str, str]:
        """The listed rows: job id -> status."""
        return dict(page.evaluate(LISTED_JOBS))

    page.select_option("#filter-status", "cancelled")  # a change filters at once
    page.locator(f"tr[data-job='{job_a}']").wait_for(state="detached")
    cancelled = shown()
    assert cancelled[job_b] == "cancelled" and set(cancelled.values()) == {"cancelled"}, cancelled

    page.select_option("#filter-status", "succeeded")
    page.locator(f"tr[data-job='{job_b}']").wait_for(state="detached")
    succeeded = shown()
    assert succeeded[job_a] == "succeeded" and set(succeeded.values()) == {"succeeded"}, succeeded

    page.fill("#filter-metadata", "origin=dashboard")
    page.click("#job-filters button[type=submit]")
    page.wait_for_function("() => document.querySelectorAll('#jobs-table tbody tr').length === 1")
    assert shown() == {job_a: "succeeded"}
    page.select_option("#filter-status", "running")
    page.locator("p.note", has_text="No jobs match.").wait_for()
    page.select_option("#filter-status", "")
    page.locator(f"tr[data-job='{job_a}']").wait_for()
    assert shown() == {job_a: "succeeded"}  # the metadata filter still holds


def test_pause_and_resume_a_running_job_then_its_validation_loss_and_eval_scores(
    page: Any, dashboard: Dashboard
) -> None:
    """Job C trains on the HTML-named file, validates and is evaluated on it, with an HTML suffix:
    paused and resumed from its page while it runs, it ends with validation-loss points on the
    chart, an eval score per checkpoint, and the event naming its model shown as text."""
    file_id = state.get("html_file")
    if file_id is None:
        pytest.skip("the HTML-named file was not uploaded")
    client = dashboard.sdk()
    job = client.fine_tuning.jobs.create(
        model="tuneforge/tiny-chat",
        training_file=file_id,
        validation_file=file_id,
        suffix=XSS,
        seed=7,
        method={"type": "supervised", "supervised": {"hyperparameters": C_HYPERPARAMETERS}},  # type: ignore[arg-type]
        extra_body={"evaluation": {"grader": EXACT, "max_new_tokens": 8, "compare_base": True}},
    )
    state["job_c"] = job.id
    page.goto(dashboard.url + f"#/jobs/{job.id}")
    page.locator("#job-status [data-status]").wait_for()
    page.wait_for_function(
        "() => document.querySelector('#job-status [data-status]').dataset.status === 'running'"
        " && Number(document.querySelector('#loss-chart').dataset.points) > 0",
        timeout=600_000,
    )
    page.locator("#pause-job:enabled").click()
    page.locator("#job-status [data-status='paused']").wait_for(timeout=120_000)
    assert client.fine_tuning.jobs.retrieve(job.id).status == "paused"
    assert page.locator("#resume-job").is_enabled() and page.locator("#pause-job").is_disabled()
    paused_at = page.locator("#events-table td", has_text="Job paused at step")
    paused_at.wait_for()
    step = int(paused_at.text_content().split("Job paused at step ")[1].split(";")[0])
    assert 1 <= step < C_STEPS, step

    page.locator("#resume-job:enabled").click()
    page.locator("#job-status [data-status='succeeded']").wait_for(timeout=600_000)
    done = client.fine_tuning.jobs.retrieve(job.id)
    assert done.status == "succeeded" and done.fine_tuned_model
    page.wait_for_function(
        f"() => Number(document.querySelector('#loss-chart').dataset.points) === {C_STEPS}"
    )

    events = client.fine_tuning.jobs.list_events(job.id, limit=1000).data
    metrics = [e.data for e in events if e.type == "metrics" and isinstance(e.data, dict)]
    valid_steps = {d["step"] for d in metrics if isinstance(d.get("valid_loss"), float)}
    assert valid_steps
    page.wait_for_function(
        f"() => Number(document.querySelector('#loss-chart').dataset.validPoints) === {len(valid_steps)}"
    )

    checkpoints = _api(dashboard, f"/fine_tuning/jobs/{job.id}/checkpoints?limit=100")["data"]
    scored = [c for c in checkpoints if c["metrics"].get("eval_score") is not None]
    assert len(scored) >= 2, checkpoints
    page.locator("#checkpoints-table tr[data-checkpoint]").first.wait_for()
    for checkpoint in scored:
        row = page.locator(f"#eval-table tr[data-step='{checkpoint['step_number']}']")
        row.wait_for()
        assert row.locator("td").nth(1).text_content() == checkpoint["id"]
        assert float(row.locator("td.score").text_content()) == pytest.approx(
            checkpoint["metrics"]["eval_score"], abs=1e-3
        )
    base = [float(t) for t in page.locator("#eval-table td.base-score").all_text_contents() if t]
    assert base, "no base_eval_score shown"

    created = page.locator("#events-table td", has_text="New fine-tuned model created")
    assert created.text_content() == f"New fine-tuned model created: {done.fine_tuned_model}"
    assert XSS in created.text_content()
    assert page.locator("img").count() == 0


def test_the_models_page_lists_the_fine_tuned_models(page: Any, dashboard: Dashboard) -> None:
    client = dashboard.sdk()
    jobs = [client.fine_tuning.jobs.retrieve(state[j]) for j in ("job_a", "job_c") if state.get(j)]
    wanted = [job.fine_tuned_model for job in jobs if job.fine_tuned_model]
    if not wanted:
        pytest.skip("no job succeeded")
    page.goto(dashboard.url + "#/models")
    page.locator("#models-table td", has_text="tuneforge/tiny-chat").first.wait_for()
    cells = page.locator("#models-table td.mono").all_text_contents()
    for model in wanted:
        assert model in cells, (model, cells)
    assert page.locator("img").count() == 0


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
