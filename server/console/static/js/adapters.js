// The Adapters view: every adapter with status, tier, rank, targets, size, version, sha256 and usage,
// polled while the view is open. Rows are updated in place (keyed by name) so that keyboard focus on a
// row's buttons survives each refresh.

import { ApiError, callJson, explain } from "./api.js";
import { adminToken } from "./credentials.js";
import { askOnce } from "./credentials_dialog.js";
import { confirmAction } from "./confirm.js";
import { formatBytes, formatClock, formatCount, shortHash } from "./format.js";

const POLL_MS = 2000;
const TOKEN_NEEDED = "Listing and changing adapters needs the server's admin token (LORAPLEX_ADMIN_TOKEN).";
const COLUMNS = [  // [field, header label (for stacked rows on narrow screens), numeric]
  ["name", "Name", false], ["status", "Status", false], ["tier", "Tier", false], ["rank", "Rank", true],
  ["targets", "Targets", false], ["size", "Size", true], ["version", "Version", true],
  ["sha256", "SHA-256", false], ["requests", "Requests", true], ["tokens", "Tokens", true],
  ["actions", "Actions", false],
];

export function createAdaptersView({ onOverwrite }) {
  const el = (id) => document.getElementById(id);
  const table = el("adapters-table"), rows = el("adapters-rows");
  const rowsByName = new Map();
  let timer = null, active = false, inFlight = false;

  el("adapters-refresh").addEventListener("click", () => refresh());
  document.addEventListener("visibilitychange", () => {
    if (active && document.visibilityState === "visible") refresh();
  });

  function schedule() {
    clearTimeout(timer);
    if (active) timer = setTimeout(refresh, POLL_MS);
  }

  async function refresh() {
    if (inFlight) return;
    if (!adminToken()) {  // every admin route refuses without it: ask instead of sending a request bound to fail
      el("adapters-loading").hidden = true;
      showError(`${TOKEN_NEEDED} Set it with “Tokens…” at the top of the page.`);
      askOnce(TOKEN_NEEDED);
      return;
    }
    inFlight = true;
    try {
      const list = await callJson("admin", "/v1/adapters");
      render(list.data || []);
      showError("");
      el("adapters-updated").textContent = `Updated ${formatClock(new Date())}`;
    } catch (error) {
      showError(explain(error, "admin"));
      if (error instanceof ApiError && error.status === 401) {
        askOnce("The server needs its admin token to list and change adapters.");
      }
    } finally {
      inFlight = false;
      el("adapters-loading").hidden = true;
      if (document.visibilityState === "visible") schedule();
    }
  }

  function showError(text) {
    const box = el("adapters-error");
    box.textContent = text;
    box.hidden = !text;
    if (text && rowsByName.size === 0) table.hidden = true;
  }

  function render(adapters) {
    const seen = new Set();
    adapters.forEach((adapter, index) => {
      seen.add(adapter.id);
      let row = rowsByName.get(adapter.id);
      if (!row) {
        row = buildRow(adapter.id);
        rowsByName.set(adapter.id, row);
      }
      if (rows.children[index] !== row.tr) rows.insertBefore(row.tr, rows.children[index] || null);
      fillRow(row, adapter);
    });
    for (const [name, row] of rowsByName) {
      if (!seen.has(name)) {
        row.tr.remove();
        rowsByName.delete(name);
      }
    }
    table.hidden = adapters.length === 0;
    el("adapters-empty").hidden = adapters.length !== 0;
  }

  function buildRow(name) {
    const tr = document.createElement("tr");
    tr.dataset.adapter = name;
    const cells = {};
    for (const [field, label, numeric] of COLUMNS) {
      const td = document.createElement("td");
      td.dataset.field = field;
      td.dataset.label = label;
      if (numeric) td.className = "num";
      tr.append(td);
      cells[field] = td;
    }
    cells.actions.className = "actions-cell";
    const overwrite = button("Overwrite", `Overwrite ${name} with a new version`, "secondary small");
    overwrite.addEventListener("click", () => onOverwrite(name));
    const remove = button("Delete", `Delete ${name}`, "danger small");
    remove.addEventListener("click", () => deleteAdapter(name));
    cells.actions.append(overwrite, remove);
    return { tr, cells };
  }

  function fillRow({ cells }, adapter) {
    setText(cells.name, adapter.id, "name");
    if (adapter.error) {
      const detail = document.createElement("div");
      detail.className = "error-text";
      detail.textContent = adapter.error;
      cells.name.append(detail);
    }
    setBadge(cells.status, adapter.status);
    setBadge(cells.tier, adapter.tier);
    cells.rank.textContent = String(adapter.rank);
    cells.targets.textContent = (adapter.target_modules || []).join(", ") || "–";
    cells.targets.title = `${adapter.num_modules} modules of the base model`;
    cells.size.textContent = formatBytes(adapter.size_bytes);
    cells.size.title = `${formatCount(adapter.size_bytes)} bytes`;
    cells.version.textContent = String(adapter.version);
    setText(cells.sha256, shortHash(adapter.sha256), "mono");
    cells.sha256.title = adapter.sha256 || "";
    cells.requests.textContent = formatCount(adapter.requests);
    cells.tokens.textContent = formatCount(adapter.tokens);
  }

  async function deleteAdapter(name) {
    const confirmed = await confirmAction(
      `Delete ${name}?`, `This unregisters ${name} and removes it from the server's adapter store. ` +
      "Requests already running on it finish first.", "Delete");
    if (!confirmed) return;
    const message = el("adapters-message");
    try {
      await callJson("admin", `/v1/adapters/${encodeURIComponent(name)}`, { method: "DELETE" });
      message.textContent = `Deleted ${name}.`;
    } catch (error) {
      message.textContent = "";
      showError(`Could not delete ${name}. ${explain(error, "admin")}`);
    }
    refresh();
  }

  return {
    show() {
      active = true;
      refresh();
    },
    hide() {
      active = false;
      clearTimeout(timer);
    },
    refresh,
  };
}

function button(text, label, className) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = text;
  b.className = className;
  b.setAttribute("aria-label", label);
  return b;
}

function setText(td, text, className) {
  td.replaceChildren();
  const span = document.createElement("span");
  span.className = className;
  span.textContent = text;
  td.append(span);
}

function setBadge(td, value) {
  const text = value || "–";
  const current = td.firstElementChild;
  if (current && current.textContent === text) return;
  const badge = document.createElement("span");
  badge.className = `badge ${text}`;
  badge.textContent = text;
  td.replaceChildren(badge);
}
