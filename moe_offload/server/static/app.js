// The chat page: talks only to this server's OpenAI-compatible API (streaming chat completions)
// and polls GET /v1/experts for the live expert view. Model text is rendered by markdown.js,
// which builds DOM nodes and never parses HTML.
import { renderMarkdown } from "./markdown.js";

const $ = (id) => document.getElementById(id);
const KEY_STORE = "moe-offload.api-key"; // sessionStorage: the key leaves with the tab
const SETTINGS_STORE = "moe-offload.settings";
const DEFAULTS = { system: "", temperature: 0.9, top_p: 0.9, max_tokens: 512 }; // the CLI's defaults
const POLL_BUSY_MS = 300;
const POLL_IDLE_MS = 2000;

const state = {
  key: sessionStorage.getItem(KEY_STORE) || "",
  keyRequired: false,
  model: null,
  history: [], // [{role, content}] sent with every request (multi-turn)
  conversation: 0, // bumped by "New chat", so a late-finishing answer cannot join the new history
  controller: null, // AbortController of the answer being streamed
  pollTimer: null,
  cells: [], // the grid's cell elements, row-major
  gridShape: "",
};

// ---------- small helpers ----------

function authHeaders() {
  return state.key ? { Authorization: `Bearer ${state.key}` } : {};
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    return body.error?.message || `${response.status} ${response.statusText}`;
  } catch {
    return `${response.status} ${response.statusText}`;
  }
}

function formatBytes(n) {
  const units = ["B", "KiB", "MiB", "GiB"];
  let i = 0;
  for (; n >= 1024 && i < units.length - 1; i++) n /= 1024;
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

const percent = (x) => (x === null || x === undefined ? "–" : `${(100 * x).toFixed(1)}%`);

// ---------- settings ----------

function loadSettings() {
  try {
    return { ...DEFAULTS, ...JSON.parse(localStorage.getItem(SETTINGS_STORE) || "{}") };
  } catch {
    return { ...DEFAULTS };
  }
}

function showSettings(s) {
  $("system").value = s.system;
  $("temperature").value = s.temperature;
  $("top-p").value = s.top_p;
  $("max-tokens").value = s.max_tokens;
}

/** The settings as request fields, or null (with the reason shown) when a field is invalid. */
function readSettings() {
  const fields = [["temperature", "temperature"], ["top-p", "top_p"], ["max-tokens", "max_tokens"]];
  const s = { system: $("system").value };
  for (const [id, name] of fields) {
    const input = $(id);
    if (!input.checkValidity() || input.value === "") {
      $("settings-error").textContent = `${input.labels[0].textContent.trim()}: ${input.validationMessage || "a number is required"}`;
      return null;
    }
    s[name] = Number(input.value);
  }
  $("settings-error").textContent = "";
  localStorage.setItem(SETTINGS_STORE, JSON.stringify(s));
  return s;
}

// ---------- API key ----------

function askForKey(message) {
  $("key-error").textContent = message || "";
  $("key-input").value = "";
  if (!$("key-dialog").open) $("key-dialog").showModal();
  $("key-input").focus();
}

async function connect() {
  const response = await fetch("/v1/models", { headers: authHeaders(), cache: "no-store" });
  if (response.status === 401) {
    sessionStorage.removeItem(KEY_STORE);
    state.key = "";
    askForKey(state.keyRequired ? await errorMessage(response) : "");
    return;
  }
  if (!response.ok) throw new Error(await errorMessage(response));
  const models = await response.json();
  state.model = models.data[0].id;
  $("model").textContent = state.model;
  $("prompt").disabled = $("send").disabled = false;
  $("forget-key").hidden = !state.keyRequired;
  document.body.dataset.ready = "true";
  $("prompt").focus();
  pollExperts();
}

// ---------- conversation ----------

function addMessage(role, text) {
  const node = document.createElement("article");
  node.className = `message ${role}`;
  const body = document.createElement("div");
  body.className = "body";
  if (role === "assistant") body.append(renderMarkdown(text));
  else body.textContent = text; // the user's own words, shown exactly as typed
  node.append(body);
  $("messages").append(node);
  node.scrollIntoView({ block: "end" });
  return node;
}

function addNote(node, text, isError) {
  const note = document.createElement("div");
  note.className = isError ? "note error" : "note";
  note.textContent = text;
  node.append(note);
}

function setBusy(busy) {
  $("send").hidden = busy;
  $("stop").hidden = !busy;
  document.body.dataset.busy = busy ? "true" : "false";
}

/** Yield the `data:` payloads of a server-sent event stream. */
async function* sseData(body) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart());
      if (data.length) yield data.join("\n");
    }
  }
}

async function send(text) {
  const settings = readSettings();
  if (!settings) {
    $("settings").hidden = false;
    return;
  }
  const conversation = state.conversation;
  const userNode = addMessage("user", text);
  state.history.push({ role: "user", content: text });
  const messages = settings.system ? [{ role: "system", content: settings.system }, ...state.history] : [...state.history];
  const node = addMessage("assistant", "");
  node.classList.add("streaming");
  const body = node.querySelector(".body");
  const controller = new AbortController();
  state.controller = controller;
  setBusy(true);
  schedulePoll(0);

  let answer = "";
  let finish = null;
  let usage = null;
  let error = null;
  let renderQueued = false;
  const render = () => {
    renderQueued = false;
    body.replaceChildren(renderMarkdown(answer));
    node.scrollIntoView({ block: "end" });
  };
  const started = performance.now();
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: { ...authHeaders(), "Content-Type": "application/json" },
      body: JSON.stringify({
        model: state.model, messages, stream: true,
        temperature: settings.temperature, top_p: settings.top_p, max_tokens: settings.max_tokens,
      }),
      signal: controller.signal,
    });
    if (!response.ok) {
      if (response.status === 401) askForKey("The API key was refused; enter it again.");
      throw new Error(await errorMessage(response));
    }
    for await (const data of sseData(response.body)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      const choice = chunk.choices?.[0];
      if (choice?.delta?.content) {
        answer += choice.delta.content;
        if (!renderQueued) {
          renderQueued = true;
          setTimeout(render, 30); // at most ~30 renders a second, however fast tokens come
        }
      }
      if (choice?.finish_reason) finish = choice.finish_reason;
      if (chunk.usage) usage = chunk.usage;
    }
  } catch (e) {
    if (e.name === "AbortError") finish = "stopped";
    else error = e.message;
  }
  if (state.controller === controller) {
    state.controller = null;
    setBusy(false);
  }
  render();
  node.classList.remove("streaming");
  if (conversation !== state.conversation) return; // "New chat" was pressed meanwhile
  node.dataset.finish = error ? "error" : finish || "incomplete";
  if (answer) {
    state.history.push({ role: "assistant", content: answer });
  } else {
    // No answer: drop the question from the history too, so roles keep alternating.
    state.history.pop();
    userNode.classList.add("dropped");
    if (!$("prompt").value) $("prompt").value = text;
  }
  if (error) addNote(node, error, true);
  else {
    const seconds = (performance.now() - started) / 1000;
    const tokens = usage ? `${usage.completion_tokens} tokens · ` : "";
    const reason = { stop: "finished", length: "max tokens reached", stopped: "stopped" }[finish] || finish || "incomplete";
    addNote(node, `${tokens}${seconds.toFixed(1)} s · ${reason}`, false);
  }
  node.scrollIntoView({ block: "end" });
  schedulePoll(0);
}

function stop() {
  if (state.controller) state.controller.abort(); // closes the connection: the server cancels the job
}

function newChat() {
  stop();
  state.conversation++;
  state.history = [];
  $("messages").replaceChildren();
  $("prompt").value = "";
  $("prompt").focus();
}

// ---------- live expert view ----------

function schedulePoll(delay) {
  clearTimeout(state.pollTimer);
  state.pollTimer = setTimeout(pollExperts, delay);
}

async function pollExperts() {
  try {
    const response = await fetch("/v1/experts", { headers: authHeaders(), cache: "no-store" });
    if (response.ok) drawExperts(await response.json());
  } catch {
    // The server restarted or the network blinked: keep the last picture and try again.
  }
  schedulePoll(state.controller ? POLL_BUSY_MS : POLL_IDLE_MS);
}

function drawLegend(view) {
  const legend = $("legend");
  if (legend.childElementCount) return;
  for (const [code, meaning] of Object.entries(view.legend)) {
    const item = document.createElement("li");
    const swatch = document.createElement("span");
    swatch.className = `cell s-${code}`;
    item.append(swatch, document.createTextNode(` ${meaning}`));
    legend.append(item);
  }
}

function buildGrid(view) {
  const grid = $("grid");
  grid.replaceChildren();
  grid.style.setProperty("--experts", String(view.num_experts));
  state.cells = [];
  for (const [row, layer] of view.layers.entries()) {
    const label = document.createElement("span");
    label.className = "row-label";
    label.textContent = String(layer);
    grid.append(label);
    for (let e = 0; e < view.num_experts; e++) {
      const cell = document.createElement("span");
      cell.className = "cell";
      cell.dataset.row = String(row);
      grid.append(cell);
      state.cells.push(cell);
    }
  }
  state.gridShape = `${view.layers.join(",")}x${view.num_experts}`;
}

function drawExperts(view) {
  drawLegend(view);
  if (state.gridShape !== `${view.layers.join(",")}x${view.num_experts}`) buildGrid(view);
  const letters = view.grid.join("");
  for (let i = 0; i < state.cells.length; i++) {
    const cell = state.cells[i];
    const code = letters[i];
    if (cell.dataset.state === code) continue;
    cell.dataset.state = code;
    cell.className = `cell s-${code}`;
    const layer = view.layers[Math.floor(i / view.num_experts)];
    cell.title = `layer ${layer}, expert ${i % view.num_experts}: ${view.legend[code]}`;
  }
  $("grid").dataset.state = view.grid.join("|"); // one string to compare (tests, debugging)
  $("stat-hit-rate").textContent = percent(view.hit_rate);
  $("stat-recall").textContent = percent(view.prefetch_recall);
  $("stat-speed").textContent = view.tokens_per_s ? view.tokens_per_s.toFixed(1) : "–";
  $("stat-bytes").textContent = view.offloaded ? formatBytes(view.bytes_copied_per_token) : "–";
  const c = view.counts;
  $("expert-note").textContent = view.offloaded
    ? `${c.g + c.f} on the GPU, ${c.c} being copied, ${c.h} in host memory, ${c.p} on the CPU · ${view.tokens} tokens`
    : "Not offloaded: every expert is resident.";
}

// ---------- wiring ----------

function wire() {
  showSettings(loadSettings());
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("prompt").value.trim();
    if (!text || state.controller || !state.model) return;
    $("prompt").value = "";
    send(text);
  });
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("stop").addEventListener("click", stop);
  $("new-chat").addEventListener("click", newChat);
  $("settings-toggle").addEventListener("click", () => {
    const open = $("settings").hidden;
    $("settings").hidden = !open;
    $("settings-toggle").setAttribute("aria-expanded", String(open));
  });
  $("settings").addEventListener("submit", (event) => event.preventDefault());
  $("settings").addEventListener("change", () => readSettings());
  $("forget-key").addEventListener("click", () => {
    sessionStorage.removeItem(KEY_STORE);
    location.reload();
  });
  $("key-dialog").addEventListener("cancel", (event) => event.preventDefault()); // no key, no page
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    state.key = $("key-input").value.trim();
    sessionStorage.setItem(KEY_STORE, state.key);
    $("key-dialog").close();
    connect().catch(showFatal);
  });
}

function showFatal(error) {
  const node = addMessage("assistant", "");
  addNote(node, `Cannot reach the server: ${error.message}`, true);
}

async function start() {
  wire();
  const config = await (await fetch("/page.json", { cache: "no-store" })).json();
  state.keyRequired = config.api_key_required;
  if (state.keyRequired && !state.key) askForKey();
  else await connect();
}

start().catch(showFatal);
