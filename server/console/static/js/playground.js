// The Playground: one prompt sent at once to the base model and up to four adapters as streamed
// completions; the answers stream side by side, each with its time to first token and tokens per second.

import { ApiError, authHeaders, callJson, errorFromBody, explain, NETWORK_ERROR } from "./api.js";
import { askOnce } from "./credentials_dialog.js";
import { formatMs } from "./format.js";
import { sseEvents } from "./sse.js";

// The shipped task adapters all read this format (server/train/tasks.py); each answers it its own way.
export const DEFAULT_PROMPT = "Input: Maria, 34, from Lisbon thinks the new phone is wonderful.\nOutput:";
const MAX_ADAPTERS = 4;
const MAX_TOKENS_LIMIT = 256;

export function createPlaygroundView() {
  const el = (id) => document.getElementById(id);
  const form = el("playground-form"), choices = el("playground-models");
  const prompt = el("playground-prompt"), maxTokens = el("playground-max-tokens");
  const temperature = el("playground-temperature");
  const checked = new Set(), known = new Set();  // model ids ticked, and every id seen so far
  let baseNames = new Set(), running = null;

  prompt.value = DEFAULT_PROMPT;
  maxTokens.max = String(MAX_TOKENS_LIMIT);
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    if (!running) run();
  });
  el("playground-stop").addEventListener("click", () => running && running.abort());

  async function loadModels() {
    const empty = el("playground-models-empty");
    try {
      const list = await callJson("inference", "/v1/models");
      showModels(list.data || []);
      empty.hidden = choices.children.length > 0;
      empty.textContent = "The server lists no model.";
    } catch (error) {
      empty.hidden = false;
      empty.textContent = `Could not list the models. ${explain(error, "inference")}`;
      if (error instanceof ApiError && error.status === 401) askOnce("This server needs its API key for inference.");
    }
  }

  function showModels(models) {
    baseNames = new Set(models.filter((m) => !m.parent).map((m) => m.id));
    let adaptersTicked = [...checked].filter((id) => !baseNames.has(id)).length;
    for (const model of models) {  // first visit: the base model and the first four adapters are ticked
      if (known.has(model.id)) continue;
      known.add(model.id);
      if (baseNames.has(model.id)) checked.add(model.id);
      else if (adaptersTicked < MAX_ADAPTERS) {
        checked.add(model.id);
        adaptersTicked += 1;
      }
    }
    const ids = new Set(models.map((m) => m.id));
    for (const id of [...checked]) if (!ids.has(id)) checked.delete(id);
    choices.replaceChildren(...models.map((model) => choice(model)));
    limitAdapters();
  }

  function choice(model) {
    const label = document.createElement("label");
    const box = document.createElement("input");
    box.type = "checkbox";
    box.value = model.id;
    box.checked = checked.has(model.id);
    box.dataset.base = String(baseNames.has(model.id));
    box.addEventListener("change", () => {
      if (box.checked) checked.add(model.id);
      else checked.delete(model.id);
      limitAdapters();
    });
    label.append(box, document.createTextNode(baseNames.has(model.id) ? `${model.id} (base model)` : model.id));
    return label;
  }

  function limitAdapters() {  // at most four adapters at once: the rest are disabled until one is unticked
    const full = [...checked].filter((id) => !baseNames.has(id)).length >= MAX_ADAPTERS;
    for (const box of choices.querySelectorAll("input[data-base='false']")) box.disabled = full && !box.checked;
  }

  function settings() {
    const tokens = Number(maxTokens.value), temp = Number(temperature.value);
    if (!prompt.value.trim()) return { problem: "Write a prompt first." };
    if (!Number.isInteger(tokens) || tokens < 1 || tokens > MAX_TOKENS_LIMIT) {
      return { problem: `Max tokens must be a whole number from 1 to ${MAX_TOKENS_LIMIT}.` };
    }
    if (!Number.isFinite(temp) || temp < 0 || temp > 2) return { problem: "Temperature must be from 0 to 2." };
    const models = [...choices.querySelectorAll("input:checked")].map((box) => box.value);
    if (!models.length) return { problem: "Tick at least one model." };
    return { models, body: { prompt: prompt.value, max_tokens: tokens, temperature: temp } };
  }

  async function run() {
    const { problem, models, body } = settings();
    const errorBox = el("playground-error");
    errorBox.textContent = problem || "";
    errorBox.hidden = !problem;
    if (problem) return;
    running = new AbortController();
    el("playground-run").disabled = true;
    el("playground-stop").disabled = false;
    const answers = el("playground-answers");
    answers.setAttribute("aria-busy", "true");
    const cards = models.map((model) => answerCard(model));
    answers.replaceChildren(...cards.map((card) => card.root));
    await Promise.all(cards.map((card) => stream(card, body, running.signal)));
    answers.setAttribute("aria-busy", "false");
    running = null;
    el("playground-run").disabled = false;
    el("playground-stop").disabled = true;
  }

  return {
    show() {
      loadModels();
    },
    hide() {},
  };
}

function answerCard(model) {
  const root = document.createElement("article");
  root.className = "answer";
  root.dataset.model = model;
  const title = document.createElement("h2");
  title.textContent = model;
  const text = document.createElement("div");
  text.className = "text";
  const stats = document.createElement("div");
  stats.className = "stats";
  stats.textContent = "Waiting for the first token…";
  root.append(title, text, stats);
  return { root, text, stats, model };
}

/** Stream one completion into its card; never rejects (failures are shown in the card). */
async function stream(card, body, signal) {
  const started = performance.now();
  let first = null, last = null, tokens = 0, usageTokens = null, finish = null;
  try {
    let response;
    try {
      response = await fetch("/v1/completions", {
        method: "POST", signal,
        headers: { "Content-Type": "application/json", ...authHeaders("inference") },
        body: JSON.stringify({ ...body, model: card.model, stream: true, stream_options: { include_usage: true } }),
      });
    } catch (error) {
      if (error.name === "AbortError") throw error;
      throw new ApiError(NETWORK_ERROR);
    }
    if (!response.ok) throw errorFromBody(response.status, await response.text());
    for await (const chunk of sseEvents(response.body)) {
      if (chunk.error) throw new ApiError(chunk.error.message || "the stream failed", { status: 500 });
      if (chunk.usage) usageTokens = chunk.usage.completion_tokens;
      const choice = chunk.choices && chunk.choices[0];
      if (!choice) continue;
      if (choice.finish_reason) finish = choice.finish_reason;
      if (!choice.text) continue;
      const now = performance.now();
      if (first === null) first = now;
      last = now;
      tokens += 1;
      card.root.dataset.chunks = String(tokens);  // how many pieces the answer arrived in (streaming is visible)
      card.text.textContent += choice.text;
      card.stats.textContent = statsLine(started, first, last, tokens, null);
    }
    card.stats.textContent = statsLine(started, first, last, usageTokens ?? tokens, finish);
    if (!card.text.textContent) card.text.textContent = "(empty answer)";
    card.root.dataset.done = "true";
  } catch (error) {
    card.root.classList.add("failed");
    if (error.name === "AbortError") {
      card.stats.textContent = `Stopped. ${statsLine(started, first, last, tokens, null)}`;
    } else {
      card.text.textContent = explain(error, "inference");
      card.stats.textContent = "Failed";
    }
    card.root.dataset.done = "error";
  }
}

/** "TTFT 120 ms · 32 tokens · 25.3 tok/s": the rate is over the tokens after the first (decode speed). */
function statsLine(started, first, last, tokens, finish) {
  if (first === null) return finish ? `No tokens (finished: ${finish})` : "Waiting for the first token…";
  const parts = [`TTFT ${formatMs(first - started)}`, `${tokens} token${tokens === 1 ? "" : "s"}`];
  const seconds = (last - first) / 1000;
  parts.push(tokens > 1 && seconds > 0 ? `${((tokens - 1) / seconds).toFixed(1)} tok/s` : "– tok/s");
  if (finish) parts.push(finish === "length" ? "stopped at max tokens" : `finished: ${finish}`);
  return parts.join(" · ");
}
