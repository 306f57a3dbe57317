// lmadapt playground: lists the server's models (GET v1/models), sends one streamed chat request per chosen model
// (POST v1/chat/completions with stream: true) and shows the answers side by side as their server-sent events
// arrive. Model text only ever reaches the page as text nodes (never parsed as HTML). An API key, when the
// server asks for one, lives in this page's memory only and is sent as `Authorization: Bearer`.
"use strict";

const $ = (id) => document.getElementById(id);
let apiKey = null;
let running = null;  // the AbortController of the answers streaming now

function say(message, bad = false) {
  $("status").textContent = message;
  $("status").classList.toggle("bad", bad);
}

function headers(json) {
  const out = json ? { "Content-Type": "application/json" } : {};
  if (apiKey !== null) out.Authorization = `Bearer ${apiKey}`;
  return out;
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) return body.error.message;
  } catch (_) { /* not JSON: say the status */ }
  return `the server answered ${response.status} ${response.statusText}`;
}

function askForKey(message) {
  $("key-form").hidden = false;
  say(message, true);
  $("api-key").focus();
}

// --- models ---

function chosenModels() {
  return [...document.querySelectorAll('#model-list input[name="model"]:checked')].map((box) => box.value);
}

function kindOf(card) {
  if (card.proxy) return `proxy-tuned on ${card.parent}`;
  return card.parent ? `on ${card.parent}` : "base";
}

function detailsOf(card) {
  if (card.proxy) {
    return `expert ${card.proxy.expert}, anti-expert ${card.proxy.anti_expert}, beta ${card.proxy.beta}`;
  }
  return card.root ? `from ${card.root}` : "";
}

function showModels(cards) {
  const before = new Set(chosenModels());
  const list = $("model-list");
  list.replaceChildren();
  const bases = cards.filter((card) => !card.parent);
  for (const card of [...bases, ...cards.filter((card) => card.parent)]) {
    const box = document.createElement("input");
    box.type = "checkbox";
    box.name = "model";
    box.value = card.id;
    box.checked = before.size ? before.has(card.id) : card === bases[0];
    const name = document.createElement("span");
    name.textContent = card.id;
    const kind = document.createElement("span");
    kind.className = "kind";
    kind.textContent = kindOf(card);
    const label = document.createElement("label");
    label.title = detailsOf(card);
    label.append(box, name, kind);
    list.append(label);
  }
}

async function loadModels() {
  say("Loading the model list…");
  let response;
  try {
    response = await fetch("v1/models", { headers: headers(false) });
  } catch (error) {
    say(`Cannot reach the server: ${error.message}`, true);
    return;
  }
  if (response.status === 401) {
    askForKey(apiKey === null ? "This server needs an API key." : "The server refused this key; check it.");
    return;
  }
  if (!response.ok) {
    say(await errorMessage(response), true);
    return;
  }
  const cards = (await response.json()).data;
  $("key-form").hidden = true;
  showModels(cards);
  const count = (n, what) => `${n} ${what}${n === 1 ? "" : "s"}`;
  const proxies = cards.filter((card) => card.proxy).length;
  const adapters = cards.filter((card) => card.parent).length - proxies;
  say(`${count(cards.length - adapters - proxies, "base model")}, ${count(adapters, "adapter")}` +
      `${proxies ? `, ${count(proxies, "proxy-tuned model")}` : ""}. Pick one or more, then send a prompt.`);
}

// --- one column per model ---

class Column {
  constructor(model, index) {
    this.model = model;
    this.node = $("column-template").content.firstElementChild.cloneNode(true);
    this.node.dataset.model = model;
    const title = this.part(".model-name");
    title.textContent = model;
    title.id = `column-${index}`;
    this.node.setAttribute("aria-labelledby", title.id);
    this.part(".text").setAttribute("aria-label", `answer of ${model}`);
    const box = document.querySelector(`#model-list input[value="${CSS.escape(model)}"]`);
    this.part(".kind").textContent = box ? box.parentElement.querySelector(".kind").textContent : "";
    this.started = performance.now();
    this.chunks = 0;
    this.tokens = null;  // the server's count, from the usage chunk
    this.finishReason = null;
  }

  part(selector) { return this.node.querySelector(selector); }

  get state() { return this.node.dataset.state; }

  set state(value) {
    this.node.dataset.state = value;
    this.node.setAttribute("aria-busy", String(value === "waiting" || value === "streaming"));
    this.show();
  }

  seconds(until = performance.now()) { return ((until - this.started) / 1000).toFixed(2); }

  append(text) {
    if (!text) return;
    if (this.firstAt === undefined) {
      this.firstAt = performance.now();
      this.part(".ttft").textContent = `first token ${this.seconds(this.firstAt)} s`;
    }
    this.part(".text").append(text);  // a text node: whatever the model wrote is shown, never parsed
    this.chunks += 1;
    this.state = "streaming";
  }

  show() {
    const count = this.tokens ?? this.chunks;
    this.part(".tokens").textContent = `${count} token${count === 1 ? "" : "s"}`;
    const end = ["done", "stopped", "error"].includes(this.state);
    if (end && this.endedAt === undefined) this.endedAt = performance.now();
    this.part(".elapsed").textContent = this.chunks || end ? `${this.seconds(this.endedAt)} s` : "";
    const finish = { done: this.finishReason && `finish: ${this.finishReason}`, stopped: "stopped", error: "failed" };
    this.part(".finish").textContent = finish[this.state] || "";
  }

  fail(message) {
    const error = this.part(".error");
    error.textContent = message;
    error.hidden = false;
    this.state = "error";
  }
}

// --- streaming ---

// Each server-sent event is "data: <json>" lines and a blank line; the stream ends with "data: [DONE]".
function handleEvent(column, event) {
  const data = event.split("\n").filter((line) => line.startsWith("data:"))
    .map((line) => line.slice(line.startsWith("data: ") ? 6 : 5)).join("\n");
  if (!data) return false;
  if (data === "[DONE]") return true;
  const chunk = JSON.parse(data);
  if (chunk.error) {
    column.fail(chunk.error.message || "the server reported an error");
    return false;
  }
  if (chunk.usage) column.tokens = chunk.usage.completion_tokens;
  for (const choice of chunk.choices || []) {
    column.append(choice.delta && choice.delta.content);
    if (choice.finish_reason) column.finishReason = choice.finish_reason;
  }
  column.show();
  return false;
}

async function stream(column, body, signal) {
  try {
    const response = await fetch("v1/chat/completions", {
      method: "POST", headers: headers(true), body: JSON.stringify(body), signal,
    });
    if (!response.ok) {
      if (response.status === 401) askForKey("The server refused the API key; enter it again.");
      column.fail(await errorMessage(response));
      return;
    }
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    let done = false;
    while (!done) {
      const { value, done: ended } = await reader.read();
      if (ended) break;
      buffer = (buffer + value).replace(/\r\n?/g, "\n");
      let cut;
      while (!done && (cut = buffer.indexOf("\n\n")) >= 0) {
        done = handleEvent(column, buffer.slice(0, cut));
        buffer = buffer.slice(cut + 2);
      }
    }
    if (column.state === "error") return;
    if (done) column.state = "done";
    else column.fail("the stream ended before the server said it was done");
  } catch (error) {
    if (error.name === "AbortError") column.state = "stopped";
    else column.fail(`the request failed: ${error.message}`);
  }
}

function busy(on) {
  $("send").disabled = on;
  $("stop").disabled = !on;
}

async function send(event) {
  event.preventDefault();
  if (running) return;
  const models = chosenModels();
  if (!models.length) {
    say("Pick at least one model.", true);
    return;
  }
  const messages = [];
  if ($("system").value.trim()) messages.push({ role: "system", content: $("system").value });
  messages.push({ role: "user", content: $("prompt").value });
  const request = {
    messages, stream: true, stream_options: { include_usage: true },
    temperature: Number($("temperature").value), max_tokens: Number($("max-tokens").value),
  };
  const columns = models.map((model, i) => new Column(model, i));
  $("outputs").replaceChildren(...columns.map((column) => column.node));
  columns.forEach((column) => column.show());
  running = new AbortController();
  busy(true);
  say(`Asking ${models.length} model${models.length === 1 ? "" : "s"}…`);
  const signal = running.signal;
  await Promise.all(columns.map((column) => stream(column, { model: column.model, ...request }, signal)));
  running = null;
  busy(false);
  const failed = columns.filter((column) => column.state === "error").length;
  say(signal.aborted ? "Stopped." : failed ? `${failed} of ${columns.length} failed.` : "Done.", failed > 0);
}

// --- wiring ---

$("key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  apiKey = $("api-key").value.trim();
  $("api-key").value = "";
  loadModels();
});
$("ask").addEventListener("submit", send);
$("stop").addEventListener("click", () => running && running.abort());
$("refresh").addEventListener("click", loadModels);
$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
    event.preventDefault();
    $("ask").requestSubmit();
  }
});
loadModels();
