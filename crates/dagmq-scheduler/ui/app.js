// The dagmq web UI: index.html loads this file, so that the page's policy allows no inline script.
"use strict";
/** Every state a task has, and `interrupted`, the outcome of a try whose worker was lost. */
const STATES = ["pending","queued","running","success","failed","up_for_retry","upstream_failed","cancelled","skipped","suspended","interrupted"];
const color = s => `var(--${s || "queued"})`;
/** The colour of text drawn on a state's colour. */
const onColor = s => `var(--${s || "queued"}-fg)`;
const esc = v => String(v ?? "").replace(/[&<>"']/g, c => ({"&":"&amp;","<":"&lt;",">":"&gt;","\"":"&quot;","'":"&#39;"}[c]));
const badge = s => `<span class="state" data-state="${esc(s)}" style="background:${color(s)};color:${onColor(s)}">${esc(s)}</span>`;
/** A time as text with its timezone's name: the viewer's, or `timeZone` (an IANA name). */
const whenText = (t, timeZone) => t ? new Date(t).toLocaleString(undefined, {timeZone, timeZoneName: "short"}) : "-";
/** A time for the page: in `timeZone` (a DAG's) with the viewer's own on hover, or the viewer's. */
const when = (t, timeZone) => !t ? "-" : timeZone
  ? `<time datetime="${esc(t)}" title="${esc(whenText(t))} (yours)">${esc(whenText(t, timeZone))}</time>`
  : `<time datetime="${esc(t)}">${esc(whenText(t))}</time>`;
/** Seconds in the unit a person would use: 230 ms, 4.2 s, 3 min 05 s, 2 h 07 min. */
const span = s => s < 1 ? `${Math.round(s * 1000)} ms` : s < 60 ? `${s.toFixed(1)} s`
  : s < 3600 ? `${Math.floor(s / 60)} min ${String(Math.floor(s % 60)).padStart(2, "0")} s`
  : `${Math.floor(s / 3600)} h ${String(Math.floor((s % 3600) / 60)).padStart(2, "0")} min`;
const duration = (a, b) => a ? span(Math.max(0, (b ? new Date(b) : new Date()) - new Date(a)) / 1000) : "-";
/** A duration for the page: one still going on (no end) is kept current between fetches. */
const live = (a, b) => a && !b ? `<span data-since="${esc(a)}">${duration(a)}</span>` : duration(a, b);

/** The last answer of each GET, by path, with its ETag: an answer whose tag has not changed
 *  (the browser asked with If-None-Match and got a 304) is not read or parsed again, and `api`
 *  returns the very same object, so a view can tell "nothing changed" by identity. */
const answers = new Map();
/** Whether a GET of the current render brought an answer that changed (see `render`). */
let changed = false;

async function api(path, options = {}) {
  const headers = {"Accept": "application/json"};
  const token = localStorage.getItem("dagmq-token");
  if (token) headers["Authorization"] = "Bearer " + token;
  if (options.body) headers["Content-Type"] = "application/json";
  const response = await fetch(path, {...options, headers});
  page.answeredAt = performance.now();
  const get = !options.method || options.method === "GET";
  const tag = response.headers.get("ETag");
  const last = answers.get(path);
  if (get && response.ok && tag && last && last.tag === tag) {
    response.body?.cancel().catch(() => {});
    return last.body;
  }
  const body = await response.json().catch(() => ({}));
  if (response.status === 401) {
    const entered = prompt("This dagmq needs an API token:");
    if (entered) { localStorage.setItem("dagmq-token", entered); return api(path, options); }
  }
  if (!response.ok) throw Object.assign(new Error(body.error || ("HTTP " + response.status)), {status: response.status});
  if (get) { changed = true; if (tag) answers.set(path, {tag, body}); }
  if (answers.size > 200) answers.delete(answers.keys().next().value);
  return body;
}

/**
 * Updates `target`'s children in place to match `html`: an element that is there already (the
 * same tag at the same place, or the same key: its id or its data-key) keeps its node, only
 * its changed attributes and texts are written, so scroll offsets, text selections, focus, what
 * is typed into a field and an opened <details> survive. An element whose data-static names what
 * it shows is left alone when the new one names the same (a view patches it itself).
 */
function morph(target, html) {
  const template = document.createElement("template");
  template.innerHTML = html;
  morphChildren(target, template.content);
}
/** Updates the element `el` in place to match `html` (one element). */
function morphOne(el, html) {
  const template = document.createElement("template");
  template.innerHTML = html;
  morphNode(el, template.content.firstElementChild);
}
const keyOf = node => node.nodeType === 1 ? (node.getAttribute("data-key") ?? (node.id || null)) : null;
function morphChildren(old, fresh) {
  const keyed = new Map();
  for (const child of old.childNodes) { const key = keyOf(child); if (key !== null) keyed.set(key, child); }
  let at = old.firstChild;
  for (const child of [...fresh.childNodes]) {
    const key = keyOf(child);
    let match = null;
    if (key !== null) { match = keyed.get(key) || null; keyed.delete(key); }
    else if (at && keyOf(at) === null && at.nodeType === child.nodeType && at.nodeName === child.nodeName
      && (at.nodeType !== 1 || at.getAttribute("type") === child.getAttribute("type"))) match = at;
    if (match && match.nodeName !== child.nodeName) match = null;
    if (!match) { old.insertBefore(child, at); continue; }
    if (match === at) at = at.nextSibling; else old.insertBefore(match, at);
    morphNode(match, child);
  }
  while (at) { const next = at.nextSibling; old.removeChild(at); at = next; }
}
function morphNode(old, fresh) {
  if (old.nodeType !== 1) { if (old.nodeValue !== fresh.nodeValue) old.nodeValue = fresh.nodeValue; return; }
  const same = old.dataset.static && old.dataset.static === fresh.dataset.static;
  for (const {name, value} of fresh.attributes) if (old.getAttribute(name) !== value) old.setAttribute(name, value);
  // An opened <details> stays open: that attribute is the reader's.
  for (const {name} of [...old.attributes]) if (!fresh.hasAttribute(name) && !(name === "open" && old.nodeName === "DETAILS")) old.removeAttribute(name);
  if (same) return;
  morphChildren(old, fresh);
}

/** What the banner shows: the last refresh's error (the page could not be brought up to date;
 *  gone with the next refresh that succeeds) before the last action's error (a refused trigger,
 *  say; it stays until the next action or navigation). */
const bannerState = {refresh: "", action: ""};
/** Which page and attempt an action's answer belongs to: a navigation or another action moves
 *  it on, and the error of an action begun before is dropped. */
let actionEpoch = 0;
function showBanner() {
  const el = document.getElementById("banner");
  const message = [bannerState.refresh, bannerState.action].filter(Boolean).join(" | ");
  el.textContent = message; el.style.display = message ? "block" : "none";
}
/** Shows a refresh's error, or clears it (`""`). */
function refreshBanner(message) { bannerState.refresh = message || ""; showBanner(); }
/** Clears the last action's error and answers the epoch of the action that begins. */
function beginAction() { bannerState.action = ""; showBanner(); return ++actionEpoch; }
/** Shows the error of the action begun at `epoch`, unless the page or the attempt moved on. */
function actionFailed(epoch, message) {
  if (epoch !== actionEpoch) return;
  bannerState.action = message; showBanner();
}
/** Actions on their way (what, on what): a second click on the same button before the first
 *  is answered (a double-click) is not sent again. */
const inFlight = new Set();
/** Runs `action` (answering a promise) as the action `key`, unless that one is on its way. */
function once(key, action) {
  if (inFlight.has(key)) return;
  inFlight.add(key);
  Promise.resolve().then(action).finally(() => inFlight.delete(key));
}

const views = {
  async dags() {
    const all = await api("/api/v1/dags");
    // A refused change keeps the loaded version (it has a version and runs); a file that never
    // loaded has none.
    const dags = all.filter(d => d.version);
    const refused = all.filter(d => d.error).map(d => `<div class="error" data-test="refused">${esc(d.error)}</div>`).join("");
    const recent = await Promise.all(dags.map(d => api(`/api/v1/runs?dag_id=${encodeURIComponent(d.dag_id)}&limit=10`)));
    if (unchanged()) return null;
    const rows = dags.map((d, i) => `<tr data-dag="${esc(d.dag_id)}" data-key="${esc(d.dag_id)}">
      <td class="wrap"><a href="#/dags/${encodeURIComponent(d.dag_id)}" data-test="dag-link">${esc(d.dag_id)}</a>${d.error ? ` <span class="error" title="${esc(d.error)}" data-test="refused-change">refused change</span>` : ""}<div class="muted">${esc(d.description)}</div></td>
      <td class="wrap">${esc(d.schedule || "manual")}<div class="muted">${esc(d.timezone)}</div></td>
      <td class="wrap">${when(d.next_run, d.timezone)}</td>
      <td>${recent[i].slice().reverse().map(r => `<a href="#/runs/${encodeURIComponent(r.run_id)}" title="${esc(r.run_id)}: ${esc(r.state)}"><span class="sq" style="background:${color(r.state)}"></span></a>`).join("")}</td>
      <td><button data-test="pause-${esc(d.dag_id)}" data-action="pause" data-dag="${esc(d.dag_id)}" data-paused="${d.paused}">${d.paused ? "Unpause" : "Pause"}</button>
          <span class="muted" data-test="paused-${esc(d.dag_id)}">${d.paused ? "paused" : "active"}</span></td>
      <td><button class="primary" data-test="trigger-${esc(d.dag_id)}" data-action="trigger" data-dag="${esc(d.dag_id)}">Trigger</button></td></tr>`).join("");
    return `<h2>DAGs</h2>${refused ? `<div class="card"><b>Refused DAG files</b>${refused}</div>` : ""}<div class="card"><div class="row"><label>Params (JSON) for Trigger:
      <input id="params" size="40" placeholder='{"date": "2026-11-22"}'></label></div>
      <table><tr><th>DAG</th><th>Schedule</th><th>Next run</th><th>Last runs</th><th>Schedule state</th><th></th></tr>${rows}</table></div>`;
  },
  async dag(query, dagId) {
    // The grid: runs as columns (oldest left), tasks as rows, a state per cell; a page of 25
    // runs at a time, from the compact grid answer rather than every run's full document.
    const offset = Math.max(0, Number(query.get("offset")) || 0);
    const [dag, page_] = await Promise.all([api(`/api/v1/dags/${encodeURIComponent(dagId)}`),
      api(`/api/v1/dags/${encodeURIComponent(dagId)}/grid?limit=25&offset=${offset}`)]);
    if (unchanged()) return null;
    const runs = page_.runs.slice().reverse();
    const ids = dag.tasks.map(t => t.task_id);
    const describe = r => `${r.run_id}: ${r.state}, ${r.kind}, logical date ${whenText(r.logical_date, dag.timezone)}, took ${duration(r.started_at, r.ended_at)}`;
    const head = runs.map(r => `<th data-run-column="${esc(r.run_id)}" data-kind="${esc(r.kind)}" title="${esc(describe(r))}"><a href="#/runs/${encodeURIComponent(r.run_id)}"><span class="sq" style="background:${color(r.state)}"></span></a>
      <div class="kind">${esc(KIND_MARK[r.kind] || "?")}</div></th>`).join("");
    // The grid's rows (a row per task: thousands in a large DAG) are written once for a set of
    // runs; a later answer for the same runs only rewrites the cells whose state changed.
    const gridKey = `${dag.version} ${offset} ${runs.map(r => r.run_id).join(" ")}`;
    const shownGrid = document.querySelector("[data-test=grid] tbody[data-static]");
    let grid = "";
    if (shownGrid && shownGrid.dataset.static === gridKey && dagPage.key === gridKey) patchGrid(shownGrid, dagPage.runs, runs);
    else grid = ids.map(id => `<tr data-grid-task="${esc(id)}" data-key="${esc(id)}"><td>${esc(id)}</td>${runs.map(r => `<td class="cell">${gridCell(r, id)}</td>`).join("")}</tr>`).join("");
    dagPage.runs = runs; dagPage.key = gridKey;
    // Bars labelled by time in the DAG's timezone.
    const labels = barLabels(runs.map(r => r.logical_date), dag.timezone);
    const durations = runs.map((r, i) => ({value: r.started_at ? ((r.ended_at ? new Date(r.ended_at) : new Date()) - new Date(r.started_at)) / 1000 : 0,
      label: labels[i], title: describe(r), color: color(r.state), href: `#/runs/${encodeURIComponent(r.run_id)}`}));
    const here = `#/dags/${encodeURIComponent(dagId)}`;
    const paging = `<div class="row" data-test="grid-paging">${page_.more ? `<a data-test="older" href="${here}?offset=${offset + 25}">older runs</a>` : ""}
      ${offset > 0 ? `<a data-test="newer" href="${here}?offset=${Math.max(0, offset - 25)}">newer runs</a>` : ""}
      <span class="muted">S scheduled, M manual, Q from the trigger queue, B backfill</span></div>`;
    const backfill = dag.schedule ? `<div class="card" data-test="backfill" data-key="backfill"><h3>Backfill</h3>
      <form id="backfill-form" class="params-form" data-dag="${esc(dag.dag_id)}">
      <label>from <input id="backfill-from" name="from" type="date" data-keep required></label>
      <label>to <input id="backfill-to" name="to" type="date" data-keep required></label>
      <span class="muted">dates are midnight in ${esc(dag.timezone)}; one run per schedule point, none twice</span>
      <button type="submit" data-test="backfill-submit">Backfill</button></form>
      ${backfilled[dag.dag_id] ? `<div class="row" data-test="backfill-result">${esc(backfilled[dag.dag_id])}</div>` : ""}</div>` : "";
    // Nodes in the colours of the latest run (none yet: queued grey).
    const newest = offset === 0 ? runs[runs.length - 1] : null;
    const tasks = dag.tasks.map(t => ({task_id: t.task_id, after: t.after, state: newest?.tasks[t.task_id] || "queued"}));
    const drawing = graphCard(tasks, "", dag.version);
    return `<h2>DAG ${esc(dag.dag_id)}</h2>
      <div class="row"><span class="muted">${esc(dag.description)}</span></div>
      <div class="row"><span>schedule <b>${esc(dag.schedule || "manual")}</b> (${esc(dag.timezone)}), ${dag.paused ? "paused" : "active"},
        next run ${when(dag.next_run, dag.timezone)}, version <code>${esc(dag.version)}</code>, <a href="#/runs?dag=${encodeURIComponent(dagId)}">all runs</a></span></div>
      <div class="card" data-test="trigger" data-key="trigger"><h3>Trigger a run</h3>${triggerForm(dag)}</div>
      <div class="card" data-test="dag-graph" data-key="dag-graph">${drawing}</div>
      <div class="card" data-test="grid" data-key="grid"><h3>${offset ? `Runs ${offset + 1} to ${offset + runs.length} back` : `Latest ${runs.length} runs`} by task</h3>${paging}<table class="grid" data-key="grid-table"><thead><tr><th></th>${head}</tr></thead><tbody data-static="${esc(gridKey)}">${grid}</tbody></table></div>
      <div class="card" data-test="durations" data-key="durations"><h3>Run durations</h3>${bars(durations, span)}</div>
      ${backfill}`;
  },
  async runs(query) {
    const dag = query.get("dag") || "", state = query.get("state") || "";
    const offset = Math.max(0, Number(query.get("offset")) || 0), limit = 100;
    const [dags, runs] = await Promise.all([api("/api/v1/dags"),
      api(`/api/v1/runs?limit=${limit}&offset=${offset}&dag_id=${encodeURIComponent(dag)}&status=${encodeURIComponent(state)}`)]);
    if (unchanged()) return null;
    const zones = new Map(dags.map(d => [d.dag_id, d.timezone]));
    const pageAt = at => `#/runs?dag=${encodeURIComponent(dag)}&state=${encodeURIComponent(state)}&offset=${at}`;
    const options = (values, selected) => values.map(v => `<option ${v === selected ? "selected" : ""}>${esc(v)}</option>`).join("");
    const rows = runs.map(r => `<tr data-run="${esc(r.run_id)}" data-key="${esc(r.run_id)}"><td class="wrap"><a href="#/runs/${encodeURIComponent(r.run_id)}">${esc(r.run_id)}</a></td>
      <td class="wide">${esc(r.dag_id)}</td><td>${badge(r.state)}</td><td class="wrap">${when(r.created_at, zones.get(r.dag_id))}</td><td>${live(r.started_at, r.ended_at)}</td>
      <td>${Object.entries(r.task_counts).map(([s, n]) => `<span title="${esc(s)}"><span class="sq" style="background:${color(s)}"></span>${n}</span>`).join(" ")}</td></tr>`).join("");
    return `<h2>Runs</h2><div class="card"><div class="row">
      <select id="f-dag" data-action="filter-runs"><option value="">all DAGs</option>${options(dags.filter(d => d.version).map(d => d.dag_id), dag)}</select>
      <select id="f-state" data-action="filter-runs"><option value="">all states</option>${options(["queued","running","suspended","success","failed","cancelled"], state)}</select>
      ${offset ? `<span class="muted">runs ${offset + 1} to ${offset + runs.length}</span>` : ""}
      ${runs.length === limit ? `<a data-test="older" href="${pageAt(offset + limit)}">older runs</a>` : ""}
      ${offset ? `<a data-test="newer" href="${pageAt(Math.max(0, offset - limit))}">newer runs</a>` : ""}</div>
      <table><thead><tr><th>Run</th><th class="wide">DAG</th><th>State</th><th>Created</th><th>Duration</th><th>Tasks</th></tr></thead><tbody>${rows}</tbody></table></div>`;
  },
  async run(query, runId) {
    const run = await api(`/api/v1/runs/${encodeURIComponent(runId)}`);
    const finished = ["success","failed","cancelled"].includes(run.state);
    // Restart runs again what did not succeed (failed, cancelled, not run); skipped tasks stay.
    const restartable = finished && run.tasks.some(t => !["success", "skipped"].includes(t.state));
    page.settled = finished;
    if (unchanged()) return null;
    const failedOnly = query.get("failed") === "1";
    const failed = run.tasks.filter(t => t.state === "failed");
    const row = t => `<tr data-task="${esc(t.task_id)}" data-key="${esc(t.task_id)}"><td><a href="#/runs/${encodeURIComponent(runId)}/tasks/${encodeURIComponent(t.task_id)}">${esc(t.task_id)}</a></td>
      <td>${badge(t.state)}${t.waiting_for ? ` <span class="muted" data-test="waiting">waiting for ${esc(t.waiting_for)}</span>` : ""}</td><td>${t.try_number}</td><td class="wide">${when(t.started_at, run.timezone)}</td><td>${live(t.started_at, t.ended_at)}</td>
      <td class="wide">${esc(t.worker || "-")}</td><td class="wide">${t.state === "running" && t.progress != null ? progress(t.progress) : ""}</td><td class="wrap" data-test="output"><code>${t.output == null ? "" : esc(typeof t.output === "string" ? t.output : JSON.stringify(t.output))}</code></td><td class="wrap error">${esc(t.error || "")}</td></tr>`;
    // The table's rows (thousands in a large run) are written once for a list of tasks; a
    // later answer rewrites only the rows of the tasks that changed.
    const listed = run.tasks.filter(t => !failedOnly || t.state === "failed");
    const tableKey = `${runId} ${failedOnly} ${listed.map(t => t.task_id).join(" ")}`;
    const signatures = new Map(listed.map(t => [t.task_id, JSON.stringify(t)]));
    const shownTable = document.querySelector("[data-test=tasks] tbody[data-static]");
    let rows = "";
    if (shownTable && shownTable.dataset.static === tableKey && runPage.key === tableKey) {
      if (shownTable.rowsFor !== tableKey) {
        shownTable.rowsById = new Map([...shownTable.rows].map(r => [r.dataset.task, r]));
        shownTable.rowsFor = tableKey;
      }
      for (const t of listed) {
        const shownRow = shownTable.rowsById.get(t.task_id);
        if (shownRow && runPage.signatures.get(t.task_id) !== signatures.get(t.task_id)) morphOne(shownRow, row(t));
      }
    } else rows = listed.map(row).join("");
    runPage.key = tableKey; runPage.signatures = signatures;
    // What failed and why comes first: each failed task with its error, before the graph.
    const failures = failed.length ? `<div class="card" data-test="failures" data-key="failures"><h3>Failed</h3>${failed.map(t =>
      `<div class="row" data-failed="${esc(t.task_id)}" data-key="failed ${esc(t.task_id)}"><a href="#/runs/${encodeURIComponent(runId)}/tasks/${encodeURIComponent(t.task_id)}"><b>${esc(t.task_id)}</b></a>
        <span class="muted">try ${t.try_number}${t.ended_at ? `, ${when(t.ended_at, run.timezone)}` : ""}</span><span class="error wrap">${esc(t.error || "")}</span></div>
      ${(t.log_tail || []).length ? `<pre class="log tail" data-tail="${esc(t.task_id)}" data-key="tail ${esc(t.task_id)}">${esc(t.log_tail.join("\n"))}</pre>` : ""}`).join("")}</div>` : "";
    const toggle = `<a data-test="failed-only" href="#/runs/${encodeURIComponent(runId)}${failedOnly ? "" : "?failed=1"}">${failedOnly ? "all tasks" : `failed only (${failed.length})`}</a>`;
    return `<h2 class="title">Run ${esc(run.run_id)} ${badge(run.state)}${run.waiting_for ? ` <span class="muted" data-test="run-waiting">waiting for ${esc(run.waiting_for)}</span>` : ""}</h2>
      <div class="row" data-test="run-times"><span>started ${when(run.started_at, run.timezone)}, ${run.ended_at ? `ended ${when(run.ended_at, run.timezone)}, ` : ""}took <b>${live(run.started_at, run.ended_at)}</b></span></div>
      <div class="row"><span class="muted">DAG <a href="#/runs?dag=${encodeURIComponent(run.dag_id)}">${esc(run.dag_id)}</a>,
        ${esc(run.kind)}, logical date ${when(run.logical_date, run.timezone)}, params ${esc(JSON.stringify(run.params))}</span>
        <button data-test="restart" ${restartable ? "" : `disabled title="${finished ? "every task succeeded: nothing to restart (clear a task to run it again)" : "the run has not finished"}"`} data-action="run" data-run="${esc(runId)}" data-verb="restart">Restart</button>
        <button data-test="cancel" ${finished ? "disabled" : ""} data-action="run" data-run="${esc(runId)}" data-verb="cancel">Cancel</button>
        <button data-test="suspend" ${run.state === "running" ? "" : "disabled"} data-action="run" data-run="${esc(runId)}" data-verb="suspend">Suspend</button>
        <button data-test="resume" ${run.state === "suspended" ? "" : "disabled"} data-action="run" data-run="${esc(runId)}" data-verb="resume">Resume</button></div>
      ${failures}
      <div class="card" data-test="tasks" data-key="tasks"><div class="row">${toggle}</div><table><thead><tr><th>Task</th><th>State</th><th>Try</th><th class="wide">Started</th><th>Took</th><th class="wide">Worker</th><th class="wide">Progress</th><th>Output</th><th>Error</th></tr></thead><tbody data-static="${esc(tableKey)}">${rows}</tbody></table></div>
      <div class="card" data-test="graph" data-key="graph">${graphCard(run.tasks, runId, run.dag_version || "")}</div>
      <div class="card" data-test="gantt" data-key="gantt"><h3>Timeline</h3>${gantt(run)}</div>`;
  },
  async task(query, runId, taskId) {
    const run = await api(`/api/v1/runs/${encodeURIComponent(runId)}`);
    const task = run.tasks.find(t => t.task_id === taskId);
    if (!task) throw new Error(`run ${runId} has no task ${taskId}`);
    const tryNumber = Number(query.get("try") || task.try_number || 1);
    const key = `${runId}/${taskId}/${tryNumber}`;
    const fresh = logState.key !== key;
    if (fresh) { logState.key = key; logState.lines = []; logState.next = 0; }
    let added = [];
    if (task.try_number > 0) {
      const log = await api(`/api/v1/runs/${encodeURIComponent(runId)}/tasks/${encodeURIComponent(taskId)}/logs?try=${tryNumber}&from=${logState.next}`);
      added = log.lines; logState.lines.push(...added); logState.next = log.next;
    }
    // The shown try's own state and times: the current try's from the task, an earlier one's
    // from its record in `tries`.
    const earlier = tryNumber !== task.try_number ? (task.tries || []).find(t => t.try_number === tryNumber) : null;
    const shown = earlier
      ? {state: earlier.outcome, worker: earlier.worker, started_at: earlier.started_at, ended_at: earlier.ended_at, error: earlier.error}
      : task;
    const tries = Array.from({length: task.try_number}, (_, i) => i + 1).map(n =>
      `<a href="#/runs/${encodeURIComponent(runId)}/tasks/${encodeURIComponent(taskId)}?try=${n}" ${n === tryNumber ? 'style="font-weight:bold"' : ""}>try ${n}</a>`).join(" ");
    const head = `<h2><a href="#/runs/${encodeURIComponent(runId)}">${esc(runId)}</a> / ${esc(taskId)} <span data-test="try-state">${badge(shown.state)}</span></h2>
      <div class="row">${tries} ${!earlier && task.state === "running" && task.progress != null ? progress(task.progress) : ""}
        <button data-test="clear" data-action="clear" data-run="${esc(runId)}" data-task="${esc(taskId)}" ${FINAL.includes(task.state) ? "" : `disabled title="the task has not finished"`}>Clear: run it and every task after it again</button>
        <span class="muted" data-test="try-times">try ${tryNumber}: worker ${esc(shown.worker || "-")}, started ${when(shown.started_at, run.timezone)}${shown.ended_at ? `, ended ${when(shown.ended_at, run.timezone)}, took ${duration(shown.started_at, shown.ended_at)}` : ""}</span></div>
      ${shown.error ? `<div class="row error">${esc(shown.error)}</div>` : ""}`;
    // Done with this try: its state is final and the log has been read to its end.
    page.settled = FINAL.includes(shown.state) && added.length === 0 && !fresh;
    const pre = document.querySelector("pre[data-test=log]");
    if (!fresh && pre && pre.dataset.key === key) {
      // In place: the head is written again, the log only grows, so a reader's scroll position
      // and selection stay; the view follows the tail only when the reader is at the bottom.
      morph(document.getElementById("task-head"), head);
      if (added.length) {
        const atBottom = pre.scrollHeight - pre.scrollTop - pre.clientHeight < 4;
        pre.querySelector(".muted")?.remove();
        pre.appendChild(document.createTextNode((pre.textContent ? "\n" : "") + added.join("\n")));
        if (atBottom) pre.scrollTop = pre.scrollHeight;
      }
      return null;
    }
    setTimeout(() => { const p = document.querySelector("pre[data-test=log]"); if (p) p.scrollTop = p.scrollHeight; });
    return `<div id="task-head">${head}</div>
      <pre class="log" data-test="log" data-key="${esc(key)}">${esc(logState.lines.join("\n")) || '<span class="muted">(no output yet)</span>'}</pre>`;
  },
  async workers() {
    const workers = await api("/api/v1/workers");
    if (unchanged()) return null;
    const rows = workers.map(w => `<tr data-worker="${esc(w.name)}" data-key="${esc(w.name)}"><td>${esc(w.name)}</td><td>${esc(w.host)}</td><td>${esc(w.queues.join(", "))}</td>
      <td data-test="slots">${w.running.length} used, ${Math.max(0, w.concurrency - w.running.length)} free of ${w.concurrency}</td>
      <td class="wrap">${w.running.map(r => `<a href="#/runs/${encodeURIComponent(r.run_id)}/tasks/${encodeURIComponent(r.task_id)}">${esc(r.task_id)}</a>`).join(", ") || "-"}</td>
      <td>${when(w.last_heartbeat)}</td></tr>`).join("");
    return `<h2>Workers</h2><div class="card"><table><thead><tr><th>Name</th><th>Host</th><th>Queues</th><th>Slots</th><th>Running</th><th>Last heartbeat</th></tr></thead><tbody>${rows}</tbody></table></div>`;
  },
  async capacity() {
    const c = await api("/api/v1/capacity");
    if (unchanged()) return null;
    const use = (used, max) => max == null ? `${used}` : `${used}/${max}`;
    const pools = c.pools.map(p => `<tr data-pool="${esc(p.pool)}"><td>${esc(p.pool)}</td><td data-test="use">${p.used}/${p.slots}</td><td>${p.free}</td><td>${p.waiting}</td></tr>`).join("")
      || `<tr><td colspan="4" class="muted">no pools declared ([pools] in the config file, --pool NAME=SLOTS)</td></tr>`;
    const dags = c.dags.map(d => `<tr data-dag-use="${esc(d.dag_id)}"><td><a href="#/dags/${encodeURIComponent(d.dag_id)}">${esc(d.dag_id)}</a></td>
      <td data-test="runs">${use(d.active_runs, d.max_active_runs)}</td><td>${d.queued_runs}</td><td data-test="tasks">${use(d.active_tasks, d.max_active_tasks)}</td></tr>`).join("")
      || `<tr><td colspan="4" class="muted">no unfinished runs</td></tr>`;
    const held = c.held_runs.map(r => `<tr data-held="${esc(r.run_id)}"><td><a href="#/runs/${encodeURIComponent(r.run_id)}">${esc(r.run_id)}</a></td><td>${esc(r.waiting_for)}</td></tr>`).join("")
      || `<tr><td colspan="2" class="muted">none</td></tr>`;
    const workers = c.workers.map(w => `<tr data-worker-use="${esc(w.name)}"><td>${esc(w.name)}</td><td>${esc(w.queues.join(", "))}</td><td data-test="slots">${w.used}/${w.concurrency}</td><td>${w.free}</td></tr>`).join("")
      || `<tr><td colspan="4" class="muted">no live worker</td></tr>`;
    const queues = (c.queues || []).map(q => `<tr data-queue="${esc(q.queue)}"><td>${esc(q.queue)}</td><td data-test="queued">${q.queued}</td><td>${q.running}</td>
      <td data-test="consumers">${q.workers} (${q.slots} slots)</td><td class="wrap error" data-test="queue-waiting">${esc(q.waiting_for || "")}</td></tr>`).join("")
      || `<tr><td colspan="5" class="muted">nothing queued and no live worker</td></tr>`;
    return `<h2>Capacity</h2>
      <div class="card" data-test="pools"><h3>Pools</h3><table><tr><th>Pool</th><th>Used</th><th>Free</th><th>Tasks waiting</th></tr>${pools}</table></div>
      <div class="card" data-test="dag-limits"><h3>DAG limits</h3><table><tr><th>DAG</th><th>Active runs / max_active_runs</th><th>Queued runs</th><th>Active tasks / max_active_tasks</th></tr>${dags}</table></div>
      <div class="card" data-test="held"><h3>Runs held back</h3><table><tr><th>Run</th><th>Waiting for</th></tr>${held}</table></div>
      <div class="card" data-test="queues"><h3>Worker pools (task queues)</h3><table><tr><th>Pool</th><th>Queued tasks</th><th>Running</th><th>Workers consuming it</th><th>Waiting for</th></tr>${queues}</table></div>
      <div class="card" data-test="worker-slots"><h3>Worker slots</h3><table><tr><th>Worker</th><th>Pools</th><th>Used</th><th>Free</th></tr>${workers}</table></div>`;
  },
  async stats() {
    const stats = await api("/api/v1/stats");
    const list = o => Object.entries(o).map(([k, v]) => `<tr><td>${esc(k)}</td><td>${v}</td></tr>`).join("") || "<tr><td>-</td></tr>";
    return `<h2>Stats</h2><div class="card" data-test="throughput"><h3>Tasks finished per minute, last hour</h3>
        ${bars(stats.finished_per_minute.map(m => ({value: m.count, label: new Date(m.minute).toLocaleTimeString([], {hour: "2-digit", minute: "2-digit"}), title: `${m.count} at ${new Date(m.minute).toLocaleTimeString()}`, color: "var(--accent)"})), n => String(n))}</div>
      <div class="card"><h3>Runs (newest 500)</h3><table>${list(stats.runs)}</table></div>
      <div class="card"><h3>Tasks in unfinished runs</h3><table>${list(stats.tasks)}</table></div>
      <div class="card"><h3>Queue depths</h3><table>${list(stats.queues)}</table></div>
      <div class="card">Live workers: <b>${stats.workers}</b></div>`;
  },
};

const logState = {key: "", lines: [], next: 0};
/** The grid's runs as the DAG page last showed them (oldest first). */
const dagPage = {runs: null, key: ""};
/** The run page's task table as last shown: its key and each task's answer as text. */
const runPage = {key: "", signatures: new Map()};

/** Whether this render may keep the page as it is: the same page as the last render, no GET
 *  answer changed since, and nothing of the page's own (a backfill's result) to show. */
function unchanged() {
  return !changed && !page.dirty && page.shown === location.hash && document.getElementById("view").childElementCount > 0;
}

/** A grid cell's content: `run`'s state of task `id`, a link to its log. */
function gridCell(run, id) {
  const state = run.tasks[id];
  return state ? `<a data-cell="${esc(state)}" href="#/runs/${encodeURIComponent(run.run_id)}/tasks/${encodeURIComponent(id)}" title="${esc(run.run_id)}: ${esc(id)} ${esc(state)}"><span class="sq" style="background:${color(state)}"></span></a>` : "";
}

/** Rewrites the cells of the grid body `body` whose state differs between `before` and
 *  `after` (the same runs, in the same order). */
function patchGrid(body, before, after) {
  if (body.rowsFor !== body.dataset.static) {
    body.rowsById = new Map([...body.rows].map(row => [row.dataset.gridTask, row]));
    body.rowsFor = body.dataset.static;
  }
  after.forEach((run, column) => {
    // A run that had finished, and has not been reopened since, has the same states.
    const was = before[column];
    if (FINAL.includes(was.state) && was.state === run.state && was.ended_at === run.ended_at) return;
    const old = was.tasks;
    const repaint = id => { const cell = body.rowsById.get(id)?.cells[column + 1]; if (cell) cell.innerHTML = gridCell(run, id); };
    for (const id in run.tasks) if (old[id] !== run.tasks[id]) repaint(id);
    for (const id in old) if (!(id in run.tasks)) repaint(id);
  });
}

/** The graph of `tasks` for a card: drawn once per DAG version (the layout of a large DAG is
 *  costly), then only the boxes whose state changed are coloured again. */
function graphCard(tasks, runId, version) {
  const key = `${version} ${runId} ${tasks.map(t => t.task_id).join(" ")}`;
  const states = Object.fromEntries(tasks.map(t => [t.task_id, t.state]));
  const shown = document.querySelector("[data-graph-key]");
  const before = drawnGraph.key === key && shown?.dataset.static === key ? drawnGraph.states : null;
  drawnGraph.key = key; drawnGraph.states = states;
  if (!before) { drawnGraph.boxes = null; return `<div data-graph-key data-static="${esc(key)}">${graph(tasks, runId)}</div>`; }
  const boxes = drawnGraph.boxes ||= new Map([...shown.querySelectorAll("[data-node]")].map(g => [g.dataset.node, g]));
  for (const t of tasks) if (before[t.task_id] !== t.state) { const g = boxes.get(t.task_id); if (g) paintNode(g, t.state); }
  return `<div data-graph-key data-static="${esc(key)}"></div>`;
}
/** The graph as drawn: its key, each task's state and (found once) each box. */
const drawnGraph = {key: "", states: null, boxes: null};

/** Colours a drawn box (`<g data-node>`) for `state`. */
function paintNode(g, state) {
  g.dataset.state = state || "";
  g.querySelector("rect").setAttribute("fill", color(state));
  g.querySelector("text").setAttribute("style", `fill:${onColor(state)}`);
  g.querySelector("title").textContent = g.dataset.node + (state ? ": " + state : "");
}
/** The grid's mark of each run kind. */
const KIND_MARK = {scheduled: "S", manual: "M", message: "Q", backfill: "B"};
/** The last backfill's answer on each DAG's page. */
const backfilled = {};
/** Whether the page shows something that no longer changes by itself (a finished run, a
 * finished try whose log has been read): it is then read again only when the tab is shown again
 * or after an action or a navigation. Also: the page
 * last shown (`shown`), whether it must be built again although no answer changed (`dirty`),
 * how many updates changed it (`updates`) and how long the last one took (`scriptMs`). */
const page = {settled: false, watchUntil: 0, renderedAt: 0, shown: "", dirty: false, updates: 0, scriptMs: 0, scriptTimes: [], answeredAt: 0};
/** States after which nothing changes unless someone acts (restart, clear). */
const FINAL = ["success", "failed", "cancelled", "upstream_failed", "skipped", "interrupted"];
const progress = p => `<span class="progress" title="${Math.round(p * 100)}%"><div style="width:${Math.round(p * 100)}%"></div></span> ${Math.round(p * 100)}%`;

/**
 * A DAG's graph as a layered drawing: tasks in columns by depth; an edge that skips columns
 * passes through a free slot (a dummy node) in each column it crosses, so it never runs behind
 * a box; the order within each column is improved by a few barycenter sweeps to cut crossings.
 * Names too long for a box are cut, with the full name on hover.
 */
function graph(tasks, runId) {
  const byId = Object.fromEntries(tasks.map(t => [t.task_id, t]));
  const depth = {};
  const depthOf = (id, seen = new Set()) => {
    if (depth[id] !== undefined) return depth[id];
    if (seen.has(id)) return 0;
    seen.add(id);
    const ups = (byId[id]?.after || []).filter(u => byId[u]);
    return depth[id] = ups.length ? 1 + Math.max(...ups.map(u => depthOf(u, seen))) : 0;
  };
  tasks.forEach(t => depthOf(t.task_id));
  const W = 150, H = 30, GX = 60, GY = 14, shown = 60, maxDummies = 3000;
  // Columns of slots: tasks (the first `shown` of each column) and, for each edge, a dummy in
  // every column between its ends.
  const layers = [];
  tasks.forEach(t => (layers[depth[t.task_id]] ||= []).push({id: t.task_id}));
  const hidden = layers.reduce((n, layer) => n + Math.max(0, layer.length - shown), 0);
  layers.forEach((layer, i) => layers[i] = layer.slice(0, shown));
  const drawn = new Set(layers.flat().map(n => n.id));
  const edges = tasks.flatMap(t => (t.after || []).filter(u => drawn.has(u) && drawn.has(t.task_id)).map(u => [u, t.task_id]));
  const span = edges.reduce((n, [u, v]) => n + depth[v] - depth[u] - 1, 0);
  const chains = edges.map(([u, v], e) => {
    const chain = [u];
    if (span <= maxDummies) {
      for (let l = depth[u] + 1; l < depth[v]; l++) { const id = `edge ${e} column ${l}`; layers[l].push({id, dummy: true}); chain.push(id); }
    }
    chain.push(v);
    return chain;
  });
  const order = {}, up = {}, down = {};
  const number = () => layers.forEach(layer => layer.forEach((n, i) => order[n.id] = i));
  number();
  for (const chain of chains) for (let i = 0; i + 1 < chain.length; i++) {
    (down[chain[i]] ||= []).push(chain[i + 1]); (up[chain[i + 1]] ||= []).push(chain[i]);
  }
  for (let sweep = 0; sweep < 4; sweep++) {
    const forward = sweep % 2 === 0, near = forward ? up : down;
    const columns = layers.map((_, i) => i);
    for (const l of forward ? columns.slice(1) : columns.slice(0, -1).reverse()) {
      const centre = n => { const ns = near[n.id] || []; return ns.length ? ns.reduce((a, m) => a + order[m], 0) / ns.length : order[n.id]; };
      layers[l] = layers[l].map(n => [centre(n), order[n.id], n]).sort((a, b) => a[0] - b[0] || a[1] - b[1]).map(k => k[2]);
      layers[l].forEach((n, i) => order[n.id] = i);
    }
  }
  const pos = {};
  layers.forEach((layer, x) => layer.forEach((n, y) => pos[n.id] = {x: 10 + x * (W + GX), y: 10 + y * (H + GY)}));
  const width = 20 + layers.length * (W + GX) - GX, height = 20 + Math.max(0, ...layers.map(l => l.length)) * (H + GY) - GY;
  // Each edge: from the right side of its upstream, along each dummy slot, into the left side
  // of its task, in curves that leave and arrive level.
  const curve = (a, b) => { const dx = (b.x - a.x) / 2; return ` C ${a.x + dx},${a.y} ${b.x - dx},${b.y} ${b.x},${b.y}`; };
  const lines = chains.map(chain => {
    const [u, v] = [chain[0], chain[chain.length - 1]];
    const points = [{x: pos[u].x + W, y: pos[u].y + H / 2}];
    for (const d of chain.slice(1, -1)) points.push({x: pos[d].x, y: pos[d].y + H / 2}, {x: pos[d].x + W, y: pos[d].y + H / 2});
    points.push({x: pos[v].x - 4, y: pos[v].y + H / 2});
    let path = `M ${points[0].x},${points[0].y}`;
    for (let i = 1; i < points.length; i++) path += i % 2 === 0 ? ` L ${points[i].x},${points[i].y}` : curve(points[i - 1], points[i]);
    return `<path data-edge="${esc(u)}>${esc(v)}" d="${path}" fill="none" stroke="#8a909c" marker-end="url(#arrow)"/>`;
  }).join("");
  const boxes = tasks.filter(t => drawn.has(t.task_id)).map(t => { const p = pos[t.task_id];
    const box = `<g data-node="${esc(t.task_id)}" data-state="${esc(t.state)}"><title>${esc(t.task_id)}${t.state ? ": " + esc(t.state) : ""}</title>
      <rect x="${p.x}" y="${p.y}" width="${W}" height="${H}" rx="6" fill="${color(t.state)}" stroke="#9aa0ad"/>
      <text x="${p.x + 8}" y="${p.y + 19}" style="fill:${onColor(t.state)}">${esc(t.task_id.length > 18 ? t.task_id.slice(0, 17) + "…" : t.task_id)}</text></g>`;
    return runId ? `<a href="#/runs/${encodeURIComponent(runId)}/tasks/${encodeURIComponent(t.task_id)}">${box}</a>` : box; }).join("");
  return `<svg width="${width}" height="${height}" viewBox="0 0 ${width} ${height}"><defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5"
    markerWidth="6" markerHeight="6" orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="#8a909c"/></marker></defs>${lines}${boxes}</svg>
    ${hidden ? `<div class="muted">${hidden} more tasks not drawn; see the table</div>` : ""}`;
}

/** A bar chart: one bar per item ({value, label, title, color, href}), `format` for the axis. */
/** The labels of bars for the times `times`, in `timeZone`: the time of day when they all fall
 *  on one day there, else date and time; with seconds when minutes alone would repeat a label. */
function barLabels(times, timeZone) {
  const day = t => new Date(t).toLocaleDateString(undefined, {timeZone});
  const oneDay = new Set(times.map(day)).size <= 1;
  const styled = timeStyle => times.map(t => new Date(t).toLocaleString(undefined,
    oneDay ? {timeStyle, timeZone} : {dateStyle: "short", timeStyle, timeZone}));
  const short = styled("short");
  return new Set(short).size === new Set(times.map(t => new Date(t).getTime())).size ? short : styled("medium");
}

/** A bar chart of `items` ({value, label, title, color, href}), values shown with `format`:
 *  labels under the bars, as many as fit side by side without overlapping. */
function bars(items, format) {
  if (!items.length) return `<div class="muted">nothing yet</div>`;
  const H = 120, B = Math.max(6, Math.min(28, Math.floor(720 / items.length) - 2)), max = Math.max(...items.map(i => i.value), 0) || 1;
  // Room past the last bar for its label (a time is wider than a bar).
  // A label is about 6 px a character at the axis's 10 px: one every `step` bars leaves each
  // room for itself.
  const widest = Math.max(...items.map(i => String(i.label).length)) * 6 + 10;
  const width = 50 + items.length * (B + 2) + 90, step = Math.max(Math.ceil(items.length / 8), Math.ceil(widest / (B + 2)));
  const rects = items.map((item, i) => { const h = Math.max(item.value > 0 ? 2 : 0, Math.round(item.value / max * H)), x = 46 + i * (B + 2);
    const bar = `<rect data-bar="${i}" x="${x}" y="${10 + H - h}" width="${B}" height="${h}" fill="${item.color}"><title>${esc(item.title)}</title></rect>`;
    const label = i % step === 0 ? `<text class="axis" x="${x}" y="${H + 26}">${esc(item.label)}</text>` : "";
    return (item.href ? `<a href="${item.href}">${bar}</a>` : bar) + label; }).join("");
  return `<svg width="${width}" height="${H + 34}" viewBox="0 0 ${width} ${H + 34}">
    <text class="axis" x="0" y="18">${esc(format(max))}</text><text class="axis" x="0" y="${H + 10}">0</text>
    <line x1="44" y1="10" x2="44" y2="${H + 10}" stroke="#dcdfe6"/>${rects}</svg>`;
}

/** The run's timeline: a row per task, a bar per try from queued (light) through running to its end, coloured by outcome; the gap between tries is the retry delay. */
function gantt(run) {
  const now = new Date();
  const tries = run.tasks.flatMap(t => [...(t.tries || []).map(x => ({...x, task_id: t.task_id, outcome: x.outcome === "interrupted" ? "up_for_retry" : x.outcome})),
    ...(t.try_number > 0 && !(t.tries || []).some(x => x.try_number === t.try_number) ? [{task_id: t.task_id, try_number: t.try_number, outcome: t.state,
      queued_at: t.queued_at, started_at: t.started_at, ended_at: t.ended_at || (["running", "queued"].includes(t.state) ? now.toISOString() : null), worker: t.worker}] : [])]
    .filter(x => x.queued_at || x.started_at));
  if (!tries.length) return `<div class="muted">no try has run yet</div>`;
  const ms = v => new Date(v).getTime();
  const start = Math.min(...tries.map(x => ms(x.queued_at || x.started_at)));
  const end = Math.max(...tries.map(x => ms(x.ended_at || x.started_at || x.queued_at)), start + 1);
  const rows = run.tasks.filter(t => tries.some(x => x.task_id === t.task_id)).map(t => t.task_id);
  const L = 160, W = 640, R = 22, scale = W / (end - start), x = v => L + (ms(v) - start) * scale;
  const bars = tries.map(x0 => { const y = 6 + rows.indexOf(x0.task_id) * R, q = x0.queued_at || x0.started_at, s0 = x0.started_at, e = x0.ended_at || s0 || q;
    const waiting = s0 ? `<rect x="${x(q)}" y="${y + 5}" width="${Math.max(1, x(s0) - x(q))}" height="${R - 12}" fill="${color(x0.outcome)}" opacity="0.35"/>` : "";
    const ran = s0 ? `<rect data-try="${esc(x0.task_id)}:${x0.try_number}" data-outcome="${esc(x0.outcome)}" x="${x(s0)}" y="${y + 2}" width="${Math.max(2, x(e) - x(s0))}" height="${R - 6}" rx="3" fill="${color(x0.outcome)}"><title>${esc(x0.task_id)} try ${x0.try_number}: ${esc(x0.outcome)}, queued ${esc(whenText(q, run.timezone))}, ran ${duration(s0, e)} on ${esc(x0.worker || "-")}</title></rect>`
      : `<rect data-try="${esc(x0.task_id)}:${x0.try_number}" data-outcome="${esc(x0.outcome)}" x="${x(q)}" y="${y + 5}" width="${Math.max(2, x(e) - x(q))}" height="${R - 12}" fill="${color(x0.outcome)}" opacity="0.35"/>`;
    return waiting + ran; }).join("");
  const labels = rows.map((id, i) => `<text class="label" x="4" y="${6 + i * R + 15}">${esc(id.length > 22 ? id.slice(0, 21) + "…" : id)}</text>`).join("");
  const height = 10 + rows.length * R + 16;
  return `<svg width="${L + W + 10}" height="${height}" viewBox="0 0 ${L + W + 10} ${height}">${labels}${bars}
    <text class="axis" x="${L}" y="${height - 2}">0</text><text class="axis" x="${L + W - 60}" y="${height - 2}">${esc(span((end - start) / 1000))}</text></svg>`;
}

/** A param's default as the form shows it. */
const shown = v => v === null || v === undefined ? "" : typeof v === "string" ? v : JSON.stringify(v);

/** The trigger form of a DAG, built from its params: a field per param with its type, default
 *  and allowed values (a select for an enum or a boolean); an empty field leaves the param to
 *  its default. A DAG without a schema also gets a JSON box for any params. The scheduler checks
 *  every value (the form does not block a submit), and its reason shows in the banner. */
function triggerForm(dag) {
  const field = p => {
    const dflt = shown(p.default);
    const hint = [p.type || "untyped", p.required ? "required" : "", dflt ? `default ${dflt}` : ""].filter(Boolean).join(", ");
    const common = `id="param-${esc(p.name)}" data-keep data-param="${esc(p.name)}" data-type="${esc(p.type || "")}"${p.required ? " required" : ""}`;
    let input;
    if (p.type === "enum" || p.type === "boolean") {
      const values = p.type === "enum" ? p.values : ["true", "false"];
      const first = `<option value="">${p.required ? "choose" : dflt ? `default (${esc(dflt)})` : "none"}</option>`;
      input = `<select ${common}>${first}${values.map(v => `<option value="${esc(v)}">${esc(v)}</option>`).join("")}</select>`;
    } else {
      const kind = {integer: 'type="number" step="1"', number: 'type="number" step="any"', date: 'type="date"'}[p.type] || 'type="text"';
      const limits = (p.max_length ? ` maxlength="${esc(p.max_length)}"` : "") + (p.pattern ? ` title="${esc("must match " + p.pattern)}"` : "");
      const placeholder = dflt || (p.type === "datetime" ? "2026-11-22T02:00:00Z" : "");
      input = `<input ${kind} ${common}${limits} placeholder="${esc(placeholder)}">`;
    }
    const about = p.description ? `<span class="muted">${esc(p.description)}</span>` : "";
    return `<label data-test="param-${esc(p.name)}"><span>${esc(p.name)} <span class="muted">${esc(hint)}</span></span>${input}${about}</label>`;
  };
  const json = dag.params_declared ? "" : `<label><span>Params (JSON) <span class="muted">any params: this DAG declares no schema</span></span>
    <textarea id="trigger-json" data-keep rows="2" cols="40" placeholder='{"date": "2026-11-22"}'></textarea></label>`;
  return `<form id="trigger-form" class="params-form" data-dag="${esc(dag.dag_id)}" novalidate>${(dag.params || []).map(field).join("")}${json}
    <button type="submit" class="primary" data-test="trigger-submit">Trigger</button></form>`;
}

/** The params the trigger form holds: the JSON box first, then each filled field (an integer or
 *  number as a JSON number, a boolean as true or false, anything else as text). */
function formParams(form) {
  const box = form.querySelector("#trigger-json");
  const params = box && box.value.trim() ? JSON.parse(box.value) : {};
  for (const el of form.querySelectorAll("[data-param]")) {
    if (el.value === "") continue;
    const type = el.dataset.type;
    params[el.dataset.param] = type === "integer" || type === "number" ? Number(el.value) : type === "boolean" ? el.value === "true" : el.value;
  }
  return params;
}

async function triggerFrom(form) {
  const epoch = beginAction();
  try {
    const params = formParams(form);
    const answer = await api(`/api/v1/dags/${encodeURIComponent(form.dataset.dag)}/runs`, {method: "POST", body: JSON.stringify({params})});
    location.hash = `#/runs/${encodeURIComponent(answer.run_id)}`;
  } catch (e) { actionFailed(epoch, e.message); }
}
document.addEventListener("submit", event => {
  const form = event.target;
  if (form.id === "trigger-form") { event.preventDefault(); once(`trigger ${form.dataset.dag}`, () => triggerFrom(form)); }
  if (form.id === "backfill-form") { event.preventDefault(); once(`backfill ${form.dataset.dag}`, () => backfillFrom(form)); }
});
/** Backfills the form's DAG over its dates (midnight in the DAG's timezone, both included). */
async function backfillFrom(form) {
  const epoch = beginAction();
  try {
    const body = {from: form.querySelector("#backfill-from").value, to: form.querySelector("#backfill-to").value};
    const answer = await api(`/api/v1/dags/${encodeURIComponent(form.dataset.dag)}/backfill`, {method: "POST", body: JSON.stringify(body)});
    backfilled[form.dataset.dag] = `${answer.runs.length} runs: ${answer.created} created, ${answer.existing} existing`;
    page.dirty = true;
    render();
  } catch (e) { actionFailed(epoch, e.message); }
}

async function trigger(dagId) {
  const epoch = beginAction();
  try {
    const text = document.getElementById("params").value.trim();
    const params = text ? JSON.parse(text) : {};
    const answer = await api(`/api/v1/dags/${encodeURIComponent(dagId)}/runs`, {method: "POST", body: JSON.stringify({params})});
    location.hash = `#/runs/${encodeURIComponent(answer.run_id)}`;
  } catch (e) { actionFailed(epoch, e.message); }
}
async function togglePause(dagId, paused) {
  const epoch = beginAction();
  try { await api(`/api/v1/dags/${encodeURIComponent(dagId)}/${paused ? "unpause" : "pause"}`, {method: "POST"}); render(); }
  catch (e) { actionFailed(epoch, e.message); }
}
async function act(runId, verb) {
  const epoch = beginAction();
  try { await api(`/api/v1/runs/${encodeURIComponent(runId)}/${verb}`, {method: "POST"}); page.watchUntil = Date.now() + 10000; render(); } catch (e) { actionFailed(epoch, e.message); }
}
/** Clears `taskId` of run `runId` and every task after it (Airflow's "clear with downstream"),
 *  once the reader confirms, then shows the run. */
async function clearTask(runId, taskId) {
  if (!confirm(`Run ${taskId} and every task after it again, in run ${runId}?`)) return;
  const epoch = beginAction();
  try {
    await api(`/api/v1/runs/${encodeURIComponent(runId)}/clear`, {method: "POST", body: JSON.stringify({tasks: [taskId], downstream: true})});
    page.watchUntil = Date.now() + 10000;
    location.hash = `#/runs/${encodeURIComponent(runId)}`;
  } catch (e) { actionFailed(epoch, e.message); }
}
function filterRuns() {
  const dag = document.getElementById("f-dag").value, state = document.getElementById("f-state").value;
  location.hash = `#/runs?dag=${encodeURIComponent(dag)}&state=${encodeURIComponent(state)}`;
}

/** What each `data-action` button does, given the button; its `data-` attributes say on what. */
const actions = {
  trigger: b => trigger(b.dataset.dag),
  pause: b => togglePause(b.dataset.dag, b.dataset.paused === "true"),
  run: b => act(b.dataset.run, b.dataset.verb),
  clear: b => clearTask(b.dataset.run, b.dataset.task),
};
// One listener for the whole view, which is rendered again every few seconds: no handler is
// written into the page, so its policy can refuse every inline script.
const view = document.getElementById("view");
view.addEventListener("click", event => {
  const button = event.target.closest("button[data-action]");
  if (button && !button.disabled && actions[button.dataset.action]) {
    once(JSON.stringify(button.dataset), () => actions[button.dataset.action](button));
  }
});
view.addEventListener("change", event => {
  if (event.target.closest("[data-action=filter-runs]")) filterRuns();
});

let rendering = false;
/** Fetches what the page shows and updates it in place (see `morph`); a page whose answers
 *  have not changed is left as it is, only its running durations are brought up to date. */
async function render() {
  if (rendering) return;
  rendering = true;
  // The header's tab of the page: its first part (dags, runs, workers, ...).
  const section = (location.hash.slice(1) || "/dags").split("?")[0].split("/").filter(Boolean)[0] || "dags";
  const markTab = () => document.querySelectorAll("header a").forEach(a => a.classList.toggle("active", a.dataset.nav === section));
  try {
    const [path, search] = (location.hash.slice(1) || "/dags").split("?");
    const query = new URLSearchParams(search || "");
    const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
    let html;
    page.settled = false;
    changed = false;
    const started = performance.now();
    if (parts[0] === "runs" && parts[1] && parts[2] === "tasks") html = await views.task(query, parts[1], parts[3]);
    else if (parts[0] === "runs" && parts[1]) html = await views.run(query, parts[1]);
    else if (parts[0] === "dags" && parts[1]) html = await views.dag(query, parts[1]);
    else html = await (views[parts[0]] || views.dags)(query);
    // Keep what the user is typing in the params box across refreshes.
    const params = document.getElementById("params");
    const typed = params ? params.value : null;
    const focused = document.activeElement && document.activeElement.id;
    // And what is typed into a form's fields (the trigger form's params).
    const kept = [...document.querySelectorAll("[data-keep]")].map(el => [el.id, el.value]);
    page.renderedAt = Date.now();
    if (html !== null) {
      morph(document.getElementById("view"), html);
      page.updates++;
    }
    for (const [id, value] of kept) { const el = document.getElementById(id); if (el && el.value !== value) el.value = value; }
    if (typed !== null && document.getElementById("params") && document.getElementById("params").value !== typed) document.getElementById("params").value = typed;
    if (focused && document.getElementById(focused) && document.activeElement !== document.getElementById(focused)) document.getElementById(focused).focus();
    tickDurations();
    page.shown = location.hash;
    page.dirty = false;
    // The time from the last answer's arrival to the page updated: reading and parsing that
    // answer, building the view and patching the page (the browser tests bound it).
    page.scriptMs = performance.now() - Math.max(started, page.answeredAt);
    if (html !== null) { page.scriptTimes.push(Math.round(page.scriptMs * 10) / 10); if (page.scriptTimes.length > 1000) page.scriptTimes.shift(); }
    markTab();
    document.getElementById("updated").textContent = (page.settled ? "finished; not refreshed since " : "updated ") + new Date().toLocaleTimeString();
    refreshBanner("");
  } catch (e) {
    // A page that cannot be shown (an unknown run or DAG: 404), or a page reached while the
    // API did not answer, is replaced by what went wrong, never left showing the page before;
    // a refresh of a page already shown that fails keeps it, under the banner.
    if (e.status === 404 || page.shown !== location.hash) {
      morph(document.getElementById("view"), `<h2>${e.status === 404 ? "Not found" : "Cannot show this page"}</h2>
        <div class="card"><div class="error" data-test="page-error">${esc(e.message)}</div>
        <div class="row muted">${e.status === 404 ? "it may have been removed, or never existed here" : "the page is tried again every 1.5 s"}</div></div>`);
      page.shown = location.hash;
      // What the page shows is no answer's: the next render builds the page again, whether or
      // not its answers changed since they were last read, and keeps polling until it does.
      page.dirty = true;
      page.settled = false;
      markTab();
      document.getElementById("updated").textContent = "";
    }
    refreshBanner(e.message);
  }
  finally { rendering = false; }
}
/** Brings each running duration (`live`) up to date. */
function tickDurations() {
  for (const el of view.querySelectorAll("[data-since]")) {
    const text = duration(el.dataset.since);
    if (el.textContent !== text) el.textContent = text;
  }
}
window.addEventListener("hashchange", () => { logState.key = ""; actionEpoch++; bannerState.action = ""; showBanner(); render(); });
/** The periodic refresh: every 1.5 s until the page is settled (a finished run, a finished
 *  try read to its end), then never; the tab coming back into view checks once (a `304` when
 *  nothing changed), as does any action or navigation. */
function tick() {
  // After an action on a run the page keeps looking for 10 s, however the run looked at once.
  if (page.settled && Date.now() > page.watchUntil) return;
  render();
}
document.addEventListener("visibilitychange", () => { if (!document.hidden && page.settled) render(); });
setInterval(tick, 1500);
render();
