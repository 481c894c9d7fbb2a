// The Tuneforge dashboard: one ES module over the JSON API.
//
// Safe by construction: the DOM is built with h(), which turns every string into a text node;
// nothing here assigns innerHTML. The key lives in sessionStorage only and travels in the
// Authorization header, never in a URL.

const KEY_STORAGE = "tuneforge.key";
const API = new URL("../v1", document.baseURI).pathname;
const FINAL = new Set(["succeeded", "failed", "cancelled"]);
const STATUSES = ["validating_files", "queued", "running", "paused", "succeeded", "failed", "cancelled"];
const METHODS = ["supervised", "dpo", "pretraining"];
const ADAPTERS = ["lora", "qlora", "dora", "prefix_tuning", "prompt_tuning", "ia3", "full"];
const POLL_MS = 2000;
// Device classes the estimator knows (tuneforge/estimates/hardware.py); only the estimate uses them.
const HARDWARE = ["cpu", "t4", "l4", "a10g", "rtx4090", "a100-40gb", "a100-80gb", "h100-80gb", "h200"];
const STEP_INCREMENTS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000];

const session = { key: sessionStorage.getItem(KEY_STORAGE), admin: false };
let cleanups = [];

// ---------- DOM ----------

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name.startsWith("on") && typeof value === "function") {
      el.addEventListener(name.slice(2), value);
    } else if (name === "dataset") {
      Object.assign(el.dataset, value);
    } else if (name in el && typeof value !== "string") {
      el[name] = value;
    } else {
      el.setAttribute(name, value === true ? "" : String(value));
    }
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

function replace(el, ...children) {
  el.replaceChildren();
  return append(el, children);
}

// Loads of one view can overlap (the view's first load still on its way when an upload loads
// again): start() marks a load and returns whether it is still the newest, so an older answer
// that lands late never replaces a newer one.
function newestOnly() {
  let newest = 0;
  return function start() {
    const mine = ++newest;
    return () => mine === newest;
  };
}

function main() {
  return document.getElementById("main");
}

function table(headers, rows, attrs) {
  return h(
    "div",
    { class: "table-wrap" },
    h(
      "table",
      attrs || {},
      h("thead", {}, h("tr", {}, headers.map((name) => h("th", { scope: "col" }, name)))),
      h("tbody", {}, rows),
    ),
  );
}

function errorBox(error) {
  const message = error instanceof ApiError ? error.message : String(error && error.message ? error.message : error);
  return h(
    "div",
    { class: "error", role: "alert" },
    message,
    error instanceof ApiError && error.param ? h("span", { class: "param" }, ` (${error.param})`) : null,
  );
}

// ---------- formatting ----------

function when(unix) {
  if (unix === null || unix === undefined) return "";
  const d = new Date(unix * 1000);
  return d.toISOString().replace("T", " ").replace(/\.\d+Z$/, "Z");
}

function bytes(n) {
  if (n === null || n === undefined) return "";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let value = n;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return unit === 0 ? `${n} B` : `${value.toFixed(1)} ${units[unit]}`;
}

function duration(seconds) {
  if (seconds === null || seconds === undefined) return "unknown";
  const s = Math.round(seconds);
  if (s < 60) return `${s} s`;
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  return `${Math.floor(s / 3600)} h ${Math.round((s % 3600) / 60)} min`;
}

function count(n) {
  return n === null || n === undefined ? "" : Number(n).toLocaleString("en-US");
}

function num(value) {
  if (typeof value !== "number") return String(value);
  return Number.isInteger(value) ? String(value) : value.toPrecision(4);
}

function statusBadge(status) {
  return h("span", { class: `status status-${status}`, dataset: { status } }, status);
}

function progressOf(job) {
  const p = job.progress || {};
  const total = p.total_steps || 0;
  const step = job.status === "succeeded" ? total || 1 : p.step || 0;
  return h("progress", { max: String(total || 1), value: String(Math.min(step, total || 1)) });
}

function progressText(job) {
  const p = job.progress;
  if (!p) return job.status === "succeeded" ? "done" : "";
  const parts = [`step ${p.step ?? 0}/${p.total_steps ?? "?"}`];
  if (typeof p.epoch === "number") parts.push(`epoch ${p.epoch.toFixed(2)}`);
  if (job.status === "running" && p.eta_seconds !== null && p.eta_seconds !== undefined) {
    parts.push(`ETA ${duration(p.eta_seconds)}`);
  }
  return parts.join(" · ");
}

function methodOf(job) {
  return (job.method && job.method.type) || "supervised";
}

function adapterOf(job) {
  const a = job.adapter;
  if (!a) return "";
  return ["lora", "qlora", "dora"].includes(a.type) && a.r ? `${a.type} r=${a.r}` : a.type;
}

// ---------- API ----------

class ApiError extends Error {
  constructor(status, message, param, code) {
    super(message);
    this.status = status;
    this.param = param;
    this.code = code;
  }
}

async function api(path, options = {}) {
  const headers = { Authorization: `Bearer ${session.key}` };
  let body;
  if (options.form) {
    body = options.form;
  } else if (options.json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(options.json);
  }
  Object.assign(headers, options.headers || {});
  const response = await fetch(API + path, {
    method: options.method || (body ? "POST" : "GET"),
    headers,
    body,
    signal: options.signal,
    cache: "no-store",
  });
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    let param = null;
    let code = null;
    try {
      const error = (await response.json()).error || {};
      message = error.message || message;
      param = error.param || null;
      code = error.code || null;
    } catch (_) {
      // not JSON: keep the status line
    }
    if (response.status === 401 && !options.signIn) signOut("Your key was refused; sign in again.");
    throw new ApiError(response.status, message, param, code);
  }
  return options.raw ? response : response.json();
}

async function listAll(path, limit = 100) {
  const rows = [];
  let after = null;
  for (;;) {
    const sep = path.includes("?") ? "&" : "?";
    const page = await api(`${path}${sep}limit=${limit}${after ? `&after=${encodeURIComponent(after)}` : ""}`);
    rows.push(...page.data);
    if (!page.has_more || page.data.length === 0) return rows;
    after = page.data[page.data.length - 1].id;
  }
}

async function download(path, filename, button) {
  const label = button ? button.textContent : "";
  if (button) {
    button.disabled = true;
    button.textContent = "Downloading…";
  }
  try {
    const response = await api(path, { raw: true });
    const blob = await response.blob();
    const url = URL.createObjectURL(blob);
    const link = h("a", { href: url, download: filename, hidden: true });
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60000);
  } catch (error) {
    if (button) button.after(errorBox(error));
  } finally {
    if (button) {
      button.disabled = false;
      button.textContent = label;
    }
  }
}

// ---------- sign-in and routing ----------

function signOut(message) {
  session.key = null;
  session.admin = false;
  sessionStorage.removeItem(KEY_STORAGE);
  route(message);
}

function signInView(message) {
  const input = h("input", {
    type: "password",
    id: "api-key",
    name: "api-key",
    autocomplete: "current-password",
    required: true,
    placeholder: "tf-… or tf-admin-…",
  });
  const status = h("div", { class: "form-status" }, message ? h("div", { class: "note" }, message) : null);
  const form = h(
    "form",
    { class: "card sign-in", id: "sign-in" },
    h("h1", {}, "Sign in"),
    h("p", {}, "Use a project key, or the admin key to also manage projects and their keys."),
    h("label", { for: "api-key" }, "API key"),
    input,
    h("button", { type: "submit" }, "Sign in"),
    status,
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    session.key = input.value.trim();
    replace(status, h("span", { class: "note" }, "Checking the key…"));
    try {
      await api("/models", { signIn: true });
    } catch (error) {
      session.key = null;
      replace(status, errorBox(error));
      return;
    }
    sessionStorage.setItem(KEY_STORAGE, session.key);
    await detectAdmin();
    if (!location.hash || location.hash === "#/") location.hash = "#/jobs";
    route();
  });
  replace(main(), form);
  input.focus();
}

async function detectAdmin() {
  try {
    await api("/admin/projects", { signIn: true });
    session.admin = true;
  } catch (_) {
    session.admin = false;
  }
}

function route(message) {
  for (const cleanup of cleanups) cleanup();
  cleanups = [];
  const nav = document.getElementById("nav");
  if (!session.key) {
    nav.hidden = true;
    signInView(message);
    return;
  }
  nav.hidden = false;
  document.getElementById("nav-admin").hidden = !session.admin;
  const path = (location.hash || "#/jobs").slice(2).split("/");
  for (const link of nav.querySelectorAll("a[data-route]")) {
    link.classList.toggle("active", link.dataset.route === (path[0] || "jobs"));
  }
  const view =
    {
      jobs: () => (path[1] ? jobView(decodeURIComponent(path.slice(1).join("/"))) : jobsView()),
      new: newJobView,
      files: filesView,
      models: modelsView,
      admin: adminView,
    }[path[0]] || jobsView;
  view().catch((error) => replace(main(), errorBox(error)));
}

function every(ms, fn) {
  const timer = setInterval(fn, ms);
  cleanups.push(() => clearInterval(timer));
}

// ---------- jobs ----------

const jobFilters = { status: "", metadata: "" };

function metadataQuery(text) {
  const params = [];
  for (const pair of text.split(/[,\n]/)) {
    const at = pair.indexOf("=");
    if (at <= 0) continue;
    const key = pair.slice(0, at).trim();
    const value = pair.slice(at + 1).trim();
    params.push(`metadata[${encodeURIComponent(key)}]=${encodeURIComponent(value)}`);
  }
  return params.join("&");
}

async function jobsView() {
  const status = h(
    "select",
    { id: "filter-status", name: "status" },
    h("option", { value: "" }, "any status"),
    STATUSES.map((s) => h("option", { value: s, selected: jobFilters.status === s }, s)),
  );
  const metadata = h("input", {
    id: "filter-metadata",
    name: "metadata",
    placeholder: "key=value, key2=value2",
    value: jobFilters.metadata,
  });
  const body = h("div", {}, h("p", { class: "note" }, "Loading jobs…"));
  const filters = h(
    "form",
    { class: "filters", id: "job-filters" },
    h("label", {}, "Status ", status),
    h("label", {}, "Metadata ", metadata),
    h("button", { type: "submit" }, "Filter"),
  );
  filters.addEventListener("submit", (event) => {
    event.preventDefault();
    jobFilters.status = status.value;
    jobFilters.metadata = metadata.value;
    load();
  });
  status.addEventListener("change", () => {
    jobFilters.status = status.value;
    load();
  });
  replace(main(), h("h1", {}, "Fine-tuning jobs"), filters, body);

  // A filter changed while a load is on its way loads again when it lands, so the list always
  // ends up showing the latest filters (not the ones that load started with).
  let busy = false;
  let again = false;
  async function load() {
    if (busy) {
      again = true;
      return;
    }
    busy = true;
    try {
      do {
        again = false;
        const wanted = { ...jobFilters };
        const query = metadataQuery(wanted.metadata);
        const jobs = (await listAll(`/fine_tuning/jobs${query ? `?${query}` : ""}`)).filter(
          (job) => !wanted.status || job.status === wanted.status,
        );
        if (!again) replace(body, jobs.length ? jobsTable(jobs) : h("p", { class: "note" }, "No jobs match."));
      } while (again);
    } catch (error) {
      replace(body, errorBox(error));
    } finally {
      busy = false;
    }
  }
  await load();
  every(5000, load);
}

function jobsTable(jobs) {
  return table(
    ["Job", "Status", "Model", "Method", "Adapter", "Progress", "Created", "Finished"],
    jobs.map((job) =>
      h(
        "tr",
        { dataset: { job: job.id } },
        h(
          "td",
          {},
          h("a", { href: `#/jobs/${encodeURIComponent(job.id)}`, class: "mono job-link" }, job.id),
          job.suffix ? h("div", { class: "suffix" }, job.suffix) : null,
        ),
        h("td", {}, statusBadge(job.status)),
        h("td", {}, job.model, job.fine_tuned_model ? h("div", { class: "ft-model mono" }, job.fine_tuned_model) : null),
        h("td", {}, methodOf(job)),
        h("td", {}, adapterOf(job)),
        h("td", { class: "progress-cell" }, progressOf(job), h("small", {}, progressText(job))),
        h("td", {}, when(job.created_at)),
        h("td", {}, when(job.finished_at)),
      ),
    ),
    { id: "jobs-table" },
  );
}

// ---------- one job ----------

function lossChart(container) {
  const points = new Map(); // step -> {train, valid}
  let plot = null;

  function data() {
    const steps = [...points.keys()].sort((a, b) => a - b);
    return [
      steps,
      steps.map((s) => points.get(s).train ?? null),
      steps.map((s) => points.get(s).valid ?? null),
    ];
  }

  function width() {
    return Math.max(280, container.clientWidth || 600);
  }

  function draw() {
    const series = data();
    const trainPoints = series[1].filter((v) => v !== null).length;
    container.dataset.points = String(trainPoints);
    container.dataset.validPoints = String(series[2].filter((v) => v !== null).length);
    if (series[0].length === 0) return;
    if (!window.uPlot) {
      replace(container, h("p", { class: "note" }, `${trainPoints} loss points (the chart library did not load)`));
      return;
    }
    if (plot) {
      plot.setData(series);
      return;
    }
    container.replaceChildren();
    plot = new window.uPlot(
      {
        width: width(),
        height: 260,
        scales: { x: { time: false } },
        axes: [{ label: "step", incrs: STEP_INCREMENTS }, { label: "loss" }],
        series: [
          { label: "step" },
          { label: "training loss", stroke: "#2563eb", width: 2, spanGaps: true },
          { label: "validation loss", stroke: "#dc2626", width: 2, spanGaps: true, points: { show: true } },
        ],
      },
      series,
      container,
    );
  }

  const onResize = () => plot && plot.setSize({ width: width(), height: 260 });
  window.addEventListener("resize", onResize);
  cleanups.push(() => window.removeEventListener("resize", onResize));

  return {
    add(data) {
      if (!data || typeof data.step !== "number") return false;
      const train = typeof data.train_loss === "number" ? data.train_loss : undefined;
      const valid = typeof data.valid_loss === "number" ? data.valid_loss : undefined;
      if (train === undefined && valid === undefined) return false;
      const point = points.get(data.step) || {};
      if (train !== undefined) point.train = train;
      if (valid !== undefined) point.valid = valid;
      points.set(data.step, point);
      return true;
    },
    draw,
  };
}

function parseSse(buffer, onMessage) {
  // Splits complete SSE messages off `buffer`; returns what is left (a partial message).
  const parts = buffer.split(/\r?\n\r?\n/);
  const rest = parts.pop();
  for (const part of parts) {
    const message = { id: null, event: null, data: [] };
    for (const line of part.split(/\r?\n/)) {
      if (!line || line.startsWith(":")) continue;
      const at = line.indexOf(":");
      const field = at < 0 ? line : line.slice(0, at);
      const value = at < 0 ? "" : line.slice(at + 1).replace(/^ /, "");
      if (field === "data") message.data.push(value);
      else if (field === "id") message.id = value;
      else if (field === "event") message.event = value;
    }
    if (message.data.length) onMessage(message);
  }
  return rest;
}

async function jobView(jobId) {
  const path = `/fine_tuning/jobs/${encodeURIComponent(jobId)}`;
  let job = await api(path);
  const events = new Map();
  const head = h("div", { class: "job-head" });
  const summary = h("div", { class: "card" });
  const chartBox = h("div", { id: "loss-chart", class: "chart", dataset: { points: "0", validPoints: "0" } });
  const chartNote = h("p", { class: "note" }, "No loss points yet.");
  const evalBox = h("div", { id: "evaluations" });
  const checkpointsBox = h("div", { id: "checkpoints" });
  const artifactsBox = h("div", { id: "artifacts" });
  const eventsBox = h("div", { id: "events" });
  const liveNote = h("span", { class: "note", id: "live-mode" });
  const spec = h("pre", { id: "job-spec", class: "spec" });
  const actionStatus = h("div", { class: "form-status" });
  const chart = lossChart(chartBox);
  let checkpoints = [];

  replace(
    main(),
    head,
    actionStatus,
    h("section", {}, h("h2", {}, "Loss"), chartNote, chartBox),
    h("section", {}, h("h2", {}, "Evaluation"), evalBox),
    h("div", { class: "grid-2" }, summary, h("section", { class: "card" }, h("h2", {}, "Spec"), spec)),
    h("section", {}, h("h2", {}, "Checkpoints"), checkpointsBox),
    h("section", {}, h("h2", {}, "Artifacts"), artifactsBox),
    h("section", {}, h("h2", {}, "Events ", liveNote), eventsBox),
  );

  async function act(action) {
    replace(actionStatus);
    try {
      job = await api(`${path}/${action}`, { method: "POST" });
      renderJob();
      refresh();
    } catch (error) {
      replace(actionStatus, errorBox(error));
    }
  }

  function renderJob() {
    const status = job.status;
    replace(
      head,
      h(
        "div",
        { class: "title-row" },
        h("h1", { class: "mono job-id" }, job.id),
        h("span", { id: "job-status" }, statusBadge(status)),
      ),
      h("div", { class: "progress-row", id: "job-progress" }, progressOf(job), h("span", {}, progressText(job))),
      h(
        "div",
        { class: "actions" },
        h("button", { type: "button", id: "cancel-job", disabled: FINAL.has(status), onclick: () => act("cancel") }, "Cancel"),
        h(
          "button",
          { type: "button", id: "pause-job", disabled: !["queued", "running"].includes(status), onclick: () => act("pause") },
          "Pause",
        ),
        h("button", { type: "button", id: "resume-job", disabled: status !== "paused", onclick: () => act("resume") }, "Resume"),
      ),
    );
    const rows = [
      ["Model", job.model],
      ["Fine-tuned model", job.fine_tuned_model || "—"],
      ["Suffix", job.suffix || "—"],
      ["Method", methodOf(job)],
      ["Adapter", adapterOf(job)],
      ["Created", when(job.created_at)],
      ["Finished", when(job.finished_at) || "—"],
      ["Trained tokens", count(job.trained_tokens) || "—"],
      [
        "Parameters",
        job.trainable_params ? `${count(job.trainable_params)} trainable of ${count(job.total_params)}` : "—",
      ],
      ["Training file", job.training_file],
      ["Validation file", job.validation_file || "—"],
    ];
    if (job.error && (job.error.message || job.error.code)) {
      rows.push(["Error", `${job.error.code || ""}: ${job.error.message || ""}`]);
    }
    const results = (job.result_files || []).map((fileId) =>
      h(
        "button",
        {
          type: "button",
          class: "link",
          onclick: (event) => download(`/files/${encodeURIComponent(fileId)}/content`, `${fileId}`, event.currentTarget),
        },
        fileId,
      ),
    );
    replace(
      summary,
      h("h2", {}, "Summary"),
      h(
        "dl",
        { class: "summary" },
        rows.map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)]),
        results.length ? [h("dt", {}, "Result files"), h("dd", {}, results)] : null,
      ),
    );
    const shown = {};
    for (const field of ["model", "training_file", "validation_file", "suffix", "seed", "method", "adapter", "export", "integrations", "metadata"]) {
      if (job[field] !== null && job[field] !== undefined) shown[field] = job[field];
    }
    spec.textContent = JSON.stringify(shown, null, 2);
  }

  function renderEvents() {
    const sorted = [...events.values()].sort((a, b) => b.created_at - a.created_at || (a.id < b.id ? 1 : -1));
    const shown = sorted.slice(0, 200);
    replace(
      eventsBox,
      sorted.length > shown.length ? h("p", { class: "note" }, `The newest ${shown.length} of ${sorted.length} events.`) : null,
      table(
        ["Time", "Level", "Type", "Message"],
        shown.map((e) =>
          h("tr", {}, h("td", {}, when(e.created_at)), h("td", {}, e.level), h("td", {}, e.type || ""), h("td", {}, e.message)),
        ),
        { id: "events-table" },
      ),
    );
    chartNote.hidden = chartBox.dataset.points !== "0";
  }

  function renderEvaluations() {
    const scores = new Map();
    for (const c of checkpoints) {
      const m = c.metrics || {};
      if (m.eval_score !== undefined || m.base_eval_score !== undefined) {
        scores.set(c.step_number, { step: c.step_number, checkpoint: c.id, ...m });
      }
    }
    for (const e of events.values()) {
      const d = e.data || {};
      if (typeof d.step === "number" && (d.eval_score !== undefined || d.base_eval_score !== undefined)) {
        scores.set(d.step, { ...(scores.get(d.step) || { step: d.step }), ...d });
      }
    }
    const rows = [...scores.values()].sort((a, b) => a.step - b.step);
    replace(
      evalBox,
      rows.length
        ? table(
            ["Step", "Checkpoint", "Eval score", "Base model's score"],
            rows.map((r) =>
              h(
                "tr",
                { dataset: { step: String(r.step) } },
                h("td", {}, r.step),
                h("td", { class: "mono" }, r.checkpoint || ""),
                h("td", { class: "score" }, r.eval_score !== undefined ? num(r.eval_score) : ""),
                h("td", { class: "base-score" }, r.base_eval_score !== undefined ? num(r.base_eval_score) : ""),
              ),
            ),
            { id: "eval-table" },
          )
        : h("p", { class: "note" }, "No evaluation scores (the job has no evaluation, or none has run yet)."),
    );
  }

  function renderCheckpoints() {
    replace(
      checkpointsBox,
      checkpoints.length
        ? table(
            ["Step", "Checkpoint", "Metrics", "Download"],
            checkpoints.map((c) =>
              h(
                "tr",
                { dataset: { checkpoint: c.id, step: String(c.step_number) } },
                h("td", {}, c.step_number),
                h("td", {}, h("div", { class: "mono" }, c.id), h("small", { class: "mono" }, c.fine_tuned_model_checkpoint)),
                h(
                  "td",
                  {},
                  Object.entries(c.metrics || {}).map(([k, v]) => h("div", {}, `${k} = ${v === null ? "—" : num(v)}`)),
                ),
                h(
                  "td",
                  {},
                  h(
                    "button",
                    {
                      type: "button",
                      onclick: (event) =>
                        download(
                          `${path}/checkpoints/${encodeURIComponent(c.id)}/artifacts/adapter`,
                          `${c.id}-adapter.tar.gz`,
                          event.currentTarget,
                        ),
                    },
                    "adapter",
                  ),
                ),
              ),
            ),
            { id: "checkpoints-table" },
          )
        : h("p", { class: "note" }, "No checkpoints yet."),
    );
  }

  async function loadArtifacts() {
    const list = await api(`${path}/artifacts`);
    replace(
      artifactsBox,
      list.data.length
        ? table(
            ["Name", "Size", "SHA-256", "Type", "Created", ""],
            list.data.map((a) =>
              h(
                "tr",
                { dataset: { artifact: a.name } },
                h("td", {}, a.name),
                h("td", { class: "size", title: `${a.bytes} bytes` }, bytes(a.bytes)),
                h("td", { class: "mono sha" }, a.sha256),
                h("td", {}, a.content_type),
                h("td", {}, when(a.created_at)),
                h(
                  "td",
                  {},
                  h(
                    "button",
                    {
                      type: "button",
                      class: "download-artifact",
                      onclick: (event) =>
                        download(
                          `${path}/artifacts/${encodeURIComponent(a.name)}`,
                          a.content_type === "application/gzip" ? `${job.id}-${a.name}.tar.gz` : `${job.id}-${a.name}`,
                          event.currentTarget,
                        ),
                    },
                    "Download",
                  ),
                ),
              ),
            ),
            { id: "artifacts-table" },
          )
        : h("p", { class: "note" }, FINAL.has(job.status) ? "No artifacts." : "Artifacts appear when the job succeeds."),
    );
  }

  // Events arrive one by one on the stream: the page is redrawn at most every 150 ms.
  let redraw = null;
  let grew = false;
  cleanups.push(() => clearTimeout(redraw));

  function addEvents(list) {
    for (const e of list) {
      if (!e || !e.id || events.has(e.id)) continue;
      events.set(e.id, e);
      if (e.type === "metrics" && chart.add(e.data)) grew = true;
    }
    if (redraw === null) {
      redraw = setTimeout(() => {
        redraw = null;
        if (grew) chart.draw();
        grew = false;
        renderEvents();
        renderEvaluations();
      }, 150);
    }
  }

  let finalShown = false;
  let refreshing = false;
  async function refresh() {
    if (refreshing) return;
    refreshing = true;
    try {
      job = await api(path);
      renderJob();
      checkpoints = (await api(`${path}/checkpoints?limit=100`)).data;
      renderCheckpoints();
      renderEvaluations();
      if (!finalShown) await loadArtifacts();
      if (FINAL.has(job.status)) finalShown = true;
    } catch (error) {
      replace(actionStatus, errorBox(error));
    } finally {
      refreshing = false;
    }
  }

  // Events: the live SSE stream where the API has it (fetch, so the key stays in a header), else
  // polling the newest page.
  const controller = new AbortController();
  cleanups.push(() => controller.abort());
  let lastEventId = null;
  let streaming = false;

  async function stream() {
    const headers = { Accept: "text/event-stream" };
    if (lastEventId) headers["Last-Event-ID"] = lastEventId;
    const response = await api(`${path}/events?stream=true`, { raw: true, headers, signal: controller.signal });
    if (!(response.headers.get("content-type") || "").startsWith("text/event-stream")) {
      const page = await response.json();
      addEvents(page.data || []);
      return false;
    }
    streaming = true;
    liveNote.textContent = "(live)";
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer = parseSse(buffer + value, (message) => {
        let payload;
        try {
          payload = JSON.parse(message.data.join("\n"));
        } catch (_) {
          return;
        }
        if (message.id) lastEventId = message.id;
        if (payload && payload.object === "fine_tuning.job.event") addEvents([payload]);
        else if (payload && Array.isArray(payload.data)) addEvents(payload.data);
        if (payload && payload.object === "fine_tuning.job") {
          job = payload;
          renderJob();
        }
      });
    }
    return true;
  }

  async function poll() {
    const page = await api(`${path}/events?limit=100`);
    const unseen = page.data.filter((e) => !events.has(e.id));
    if (unseen.length === page.data.length && page.has_more) addEvents(await listAll(`${path}/events`));
    else addEvents(unseen);
  }

  renderJob();
  await refresh();
  (async () => {
    try {
      while (!controller.signal.aborted && (await stream())) {
        await refresh();
        if (FINAL.has(job.status)) break;
        await new Promise((resolve) => setTimeout(resolve, 1000));
      }
    } catch (error) {
      if (controller.signal.aborted) return;
    }
    if (controller.signal.aborted) return;
    if (!streaming) {
      liveNote.textContent = "(refreshed every 2 s)";
      addEvents(await listAll(`${path}/events`));
    } else {
      liveNote.textContent = "";
    }
  })();
  every(POLL_MS, async () => {
    if (finalShown && FINAL.has(job.status)) return;
    await refresh();
    if (!streaming && !controller.signal.aborted) await poll().catch(() => {});
  });
}

// ---------- files ----------

async function filesView() {
  const input = h("input", { type: "file", id: "upload-file", name: "file", accept: ".jsonl,.json,.txt", required: true });
  const status = h("div", { class: "form-status", id: "upload-status" });
  const listBox = h("div", {}, h("p", { class: "note" }, "Loading files…"));
  const form = h(
    "form",
    { class: "card", id: "upload-form" },
    h("h2", {}, "Upload a training file"),
    h("p", { class: "note" }, "JSONL, one example a line; the API checks every line and names the first bad one."),
    input,
    h("button", { type: "submit" }, "Upload"),
    status,
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    if (!input.files.length) return;
    const data = new FormData();
    data.append("purpose", "fine-tune");
    data.append("file", input.files[0]);
    replace(status, h("span", { class: "note" }, `Uploading ${input.files[0].name}…`));
    try {
      const file = await api("/files", { form: data });
      replace(status, h("div", { class: "ok" }, `Uploaded ${file.filename} as `, h("span", { class: "mono" }, file.id)));
      form.reset();
      await load();
    } catch (error) {
      replace(status, errorBox(error));
    }
  });
  replace(main(), h("h1", {}, "Files"), form, h("section", {}, h("h2", {}, "Your files"), listBox));

  const startLoad = newestOnly();
  async function load() {
    const isNewest = startLoad();
    const files = (await api("/files")).data;
    if (!isNewest()) return;
    replace(
      listBox,
      files.length
        ? table(
            ["File", "Name", "Purpose", "Size", "Created", ""],
            files.map((f) =>
              h(
                "tr",
                {},
                h("td", { class: "mono" }, f.id),
                h("td", {}, f.filename),
                h("td", {}, f.purpose),
                h("td", { title: `${f.bytes} bytes` }, bytes(f.bytes)),
                h("td", {}, when(f.created_at)),
                h(
                  "td",
                  {},
                  h(
                    "button",
                    {
                      type: "button",
                      onclick: (event) => download(`/files/${encodeURIComponent(f.id)}/content`, f.filename, event.currentTarget),
                    },
                    "Download",
                  ),
                ),
              ),
            ),
            { id: "files-table" },
          )
        : h("p", { class: "note" }, "No files yet."),
    );
  }
  await load();
}

// ---------- new job ----------

function field(label, control, help) {
  return h("label", { class: "field" }, h("span", {}, label), control, help ? h("small", {}, help) : null);
}

function select(id, options, selected) {
  return h(
    "select",
    { id, name: id },
    options.map(([value, label]) => h("option", { value, selected: value === selected }, label)),
  );
}

async function newJobView() {
  const [models, files] = await Promise.all([api("/models"), api("/files?purpose=fine-tune")]);
  const fileOptions = files.data.map((f) => [f.id, `${f.filename} (${f.id})`]);
  const c = {
    model: select("model", models.data.map((m) => [m.id, m.id]), models.data.length ? models.data[0].id : ""),
    training_file: select("training_file", fileOptions, fileOptions.length ? fileOptions[0][0] : ""),
    validation_file: select("validation_file", [["", "none"], ...fileOptions], ""),
    method: select("method", METHODS.map((m) => [m, m]), "supervised"),
    adapter: select("adapter", ADAPTERS.map((a) => [a, a]), "lora"),
    r: h("input", { id: "r", type: "number", min: "1", max: "1024", value: "16" }),
    alpha: h("input", { id: "alpha", type: "number", min: "0", step: "any", value: "32" }),
    n_epochs: h("input", { id: "n_epochs", type: "number", min: "1", max: "50", placeholder: "auto" }),
    batch_size: h("input", { id: "batch_size", type: "number", min: "1", max: "256", placeholder: "auto" }),
    learning_rate: h("input", { id: "learning_rate", type: "number", min: "0", step: "any", placeholder: "the method's default" }),
    max_steps: h("input", { id: "max_steps", type: "number", min: "1", placeholder: "from the epochs" }),
    suffix: h("input", { id: "suffix", maxlength: "64", placeholder: "my-model" }),
    seed: h("input", { id: "seed", type: "number", min: "0" }),
    metadata: h("textarea", { id: "metadata", rows: "2", placeholder: "team=search\nticket=42" }),
    merged: h("input", { id: "export-merged", type: "checkbox" }),
    hardware: select("hardware", [["", "no fit check"], ...HARDWARE.map((g) => [g, g])], ""),
  };
  const estimateBox = h("div", { id: "estimate", class: "card" }, h("p", { class: "note" }, "The estimate appears here."));
  const specBox = h("pre", { id: "spec-preview", class: "spec" });
  const submit = h("button", { type: "submit", id: "create-job", disabled: true }, "Create job");
  const estimateButton = h("button", { type: "button", id: "estimate-job" }, "Estimate");
  const status = h("div", { class: "form-status", id: "create-status" });
  const form = h(
    "form",
    { id: "new-job", class: "card job-form" },
    h(
      "fieldset",
      {},
      h("legend", {}, "Data and model"),
      field("Base model", c.model),
      field("Training file", c.training_file, fileOptions.length ? null : "Upload a file first (Files)."),
      field("Validation file", c.validation_file),
    ),
    h(
      "fieldset",
      {},
      h("legend", {}, "Method and adapter"),
      field("Method", c.method),
      field("Adapter", c.adapter),
      field("LoRA rank r", c.r),
      field("LoRA alpha", c.alpha),
    ),
    h(
      "fieldset",
      {},
      h("legend", {}, "Hyperparameters"),
      field("Epochs", c.n_epochs),
      field("Batch size", c.batch_size),
      field("Learning rate", c.learning_rate),
      field("Max steps", c.max_steps),
    ),
    h(
      "fieldset",
      {},
      h("legend", {}, "Output"),
      field("Suffix", c.suffix),
      field("Seed", c.seed),
      field("Metadata", c.metadata, "key=value, one a line"),
      h("label", { class: "check" }, c.merged, " Also export a merged model"),
    ),
    h("fieldset", {}, h("legend", {}, "Estimate only"), field("Check the fit on", c.hardware, "Not part of the job.")),
    h("div", { class: "actions" }, estimateButton, submit),
    status,
  );
  replace(
    main(),
    h("h1", {}, "New fine-tuning job"),
    h("div", { class: "grid-2 new-job" }, form, h("div", {}, h("h2", {}, "Estimate"), estimateBox, h("h2", {}, "Spec"), specBox)),
  );

  function numberOf(input) {
    return input.value === "" ? undefined : Number(input.value);
  }

  function buildSpec() {
    const hyperparameters = {};
    for (const name of ["n_epochs", "batch_size", "learning_rate", "max_steps"]) {
      const value = numberOf(c[name]);
      if (value !== undefined) hyperparameters[name] = value;
    }
    const method = c.method.value;
    const adapter = { type: c.adapter.value };
    if (["lora", "qlora", "dora"].includes(adapter.type)) {
      if (numberOf(c.r) !== undefined) adapter.r = numberOf(c.r);
      if (numberOf(c.alpha) !== undefined) adapter.alpha = numberOf(c.alpha);
    }
    const spec = {
      model: c.model.value,
      training_file: c.training_file.value,
      method: { type: method, [method]: { hyperparameters } },
      adapter,
    };
    if (c.validation_file.value) spec.validation_file = c.validation_file.value;
    if (c.suffix.value) spec.suffix = c.suffix.value;
    if (numberOf(c.seed) !== undefined) spec.seed = numberOf(c.seed);
    const metadata = {};
    for (const line of c.metadata.value.split("\n")) {
      const at = line.indexOf("=");
      if (at > 0) metadata[line.slice(0, at).trim()] = line.slice(at + 1).trim();
    }
    if (Object.keys(metadata).length) spec.metadata = metadata;
    if (c.merged.checked) spec.export = ["merged"];
    return spec;
  }

  function estimateBody(spec) {
    const body = { model: spec.model, adapter: spec.adapter, method: spec.method };
    if (spec.training_file) body.training_file = spec.training_file;
    if (c.hardware.value) body.hardware = { gpu: c.hardware.value };
    return body;
  }

  let estimatedFor = null;
  let timer = null;
  const startEstimate = newestOnly();

  async function runEstimate() {
    const spec = buildSpec();
    const body = estimateBody(spec);
    const key = JSON.stringify(body);
    const isNewest = startEstimate();
    replace(estimateBox, h("p", { class: "note" }, "Estimating…"));
    try {
      const answer = await api("/fine_tuning/estimates", { json: body });
      if (!isNewest()) return;
      estimatedFor = key;
      replace(estimateBox, estimateView(answer));
    } catch (error) {
      if (!isNewest()) return;
      estimatedFor = null;
      replace(estimateBox, errorBox(error));
      if (error instanceof ApiError && error.status === 503) {
        clearTimeout(timer);
        timer = setTimeout(runEstimate, 2000); // estimates busy: the API says to retry
      }
    }
    sync();
  }

  function sync() {
    const spec = buildSpec();
    specBox.textContent = JSON.stringify(spec, null, 2);
    submit.disabled = estimatedFor !== JSON.stringify(estimateBody(spec)) || !spec.training_file;
  }

  function changed() {
    sync();
    clearTimeout(timer);
    timer = setTimeout(runEstimate, 500);
  }
  cleanups.push(() => clearTimeout(timer));

  form.addEventListener("input", changed);
  form.addEventListener("change", changed);
  estimateButton.addEventListener("click", () => {
    clearTimeout(timer);
    runEstimate();
  });
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    if (submit.disabled) return;
    submit.disabled = true;
    replace(status, h("span", { class: "note" }, "Creating…"));
    try {
      const job = await api("/fine_tuning/jobs", { json: buildSpec() });
      location.hash = `#/jobs/${encodeURIComponent(job.id)}`;
    } catch (error) {
      replace(status, errorBox(error));
      sync();
    }
  });
  sync();
  if (fileOptions.length) runEstimate();
}

function estimateView(e) {
  const m = e.memory || {};
  const rec = e.recommendation || {};
  const rows = [
    ["Trainable parameters", `${count(e.trainable_params)} of ${count(e.total_params)} (${num(e.trainable_percent)} %)`],
    ["Memory per device", bytes(m.total)],
    ["— weights / gradients", `${bytes(m.weights)} / ${bytes(m.gradients)}`],
    ["— optimizer / activations", `${bytes(m.optimizer)} / ${bytes(m.activations)}`],
    ["Tokens per epoch", count(e.tokens_per_epoch) || "unknown"],
    ["Epochs × batch size", `${e.n_epochs} × ${e.batch_size}`],
    ["Steps", e.steps === null ? "unknown" : count(e.steps)],
    ["Estimated time", e.estimated_seconds === null ? "unknown (no throughput figure)" : duration(e.estimated_seconds)],
  ];
  if (e.hardware) rows.push(["Hardware", `${e.hardware}${e.fits === null ? "" : e.fits ? " — fits" : " — does not fit"}`]);
  const advice = [...(rec.reasons || []), ...(rec.fit_advice || []), ...(e.memory_notes || [])];
  return h(
    "div",
    { dataset: { steps: String(e.steps ?? "") } },
    h("dl", { class: "summary" }, rows.map(([k, v]) => [h("dt", {}, k), h("dd", {}, v)])),
    h("h3", {}, `Advice: ${rec.method || ""} with ${rec.adapter || ""}`),
    advice.length ? h("ul", { class: "advice" }, advice.map((line) => h("li", {}, line))) : null,
  );
}

// ---------- models ----------

async function modelsView() {
  const models = await api("/models");
  replace(
    main(),
    h("h1", {}, "Models"),
    h("p", { class: "note" }, "Base models on offer, then this project's fine-tuned models."),
    table(
      ["Model", "Owner", "Created"],
      models.data.map((m) => h("tr", {}, h("td", { class: "mono" }, m.id), h("td", {}, m.owned_by), h("td", {}, when(m.created)))),
      { id: "models-table" },
    ),
  );
}

// ---------- admin ----------

async function adminView() {
  if (!session.admin) {
    replace(main(), h("p", { class: "note" }, "Only the admin key sees projects and keys."));
    return;
  }
  const name = h("input", { id: "project-name", required: true, maxlength: "256", placeholder: "project name" });
  const status = h("div", { class: "form-status" });
  const listBox = h("div", {});
  const form = h("form", { class: "card filters", id: "new-project" }, h("label", {}, "New project ", name), h("button", { type: "submit" }, "Create"), status);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    try {
      await api("/admin/projects", { json: { name: name.value } });
      form.reset();
      await load();
    } catch (error) {
      replace(status, errorBox(error));
    }
  });
  replace(main(), h("h1", {}, "Projects and keys"), form, listBox);

  const startLoad = newestOnly();
  async function load() {
    const isNewest = startLoad();
    const projects = (await api("/admin/projects")).data;
    const sections = [];
    for (const project of projects) {
      const keys = (await api(`/admin/projects/${encodeURIComponent(project.id)}/api_keys`)).data;
      const shown = h("div", { class: "form-status" });
      sections.push(
        h(
          "section",
          { class: "card", dataset: { project: project.id } },
          h("h2", {}, project.name, " ", h("small", { class: "mono" }, project.id)),
          table(
            ["Key", "Created", "Revoked", ""],
            keys.map((k) =>
              h(
                "tr",
                { dataset: { key: k.id } },
                h("td", { class: "mono" }, k.redacted_value),
                h("td", {}, when(k.created_at)),
                h("td", {}, when(k.revoked_at)),
                h(
                  "td",
                  {},
                  k.revoked_at
                    ? null
                    : h(
                        "button",
                        {
                          type: "button",
                          onclick: async () => {
                            await api(`/admin/projects/${encodeURIComponent(project.id)}/api_keys/${encodeURIComponent(k.id)}`, {
                              method: "DELETE",
                            }).catch((error) => replace(shown, errorBox(error)));
                            await load();
                          },
                        },
                        "Revoke",
                      ),
                ),
              ),
            ),
          ),
          h(
            "button",
            {
              type: "button",
              onclick: async () => {
                try {
                  const key = await api(`/admin/projects/${encodeURIComponent(project.id)}/api_keys`, { method: "POST" });
                  await load();
                  const box = listBox.querySelector(`[data-project="${CSS.escape(project.id)}"] .form-status`);
                  if (box) replace(box, h("div", { class: "ok" }, "New key (shown once): ", h("code", { class: "mono" }, key.value)));
                } catch (error) {
                  replace(shown, errorBox(error));
                }
              },
            },
            "New key",
          ),
          shown,
        ),
      );
    }
    if (isNewest()) replace(listBox, sections);
  }
  await load();
}

// ---------- start ----------

document.getElementById("sign-out").addEventListener("click", () => signOut("Signed out."));
window.addEventListener("hashchange", () => route());

(async () => {
  if (session.key) await detectAdmin();
  route();
})();
