// The playground: a chat against this server's own /v1/chat/completions, streamed, with the server's figures
// under each answer and a chart across the conversation. It reads only what the API returns; every piece of text a
// user or the model wrote is set with textContent, never parsed as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const conversation = []; // the conversation as chat messages
const turns = []; // per answer: {ttft, rate} for the chart
let running = null; // the AbortController of the answer being streamed

function headers() {
  const key = $("api-key").value.trim();
  const sent = { "Content-Type": "application/json" };
  if (key) sent.Authorization = `Bearer ${key}`;
  return sent;
}

function say(text, isError = false) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

async function errorText(resp) {
  try {
    const body = await resp.json();
    const error = body.error || {};
    return `${resp.status}: ${error.message || resp.statusText}`;
  } catch {
    return `${resp.status}: ${resp.statusText}`;
  }
}

async function loadModels() {
  const resp = await fetch("/v1/models", { headers: headers() });
  if (!resp.ok) {
    say(`models: ${await errorText(resp)}`, true);
    return;
  }
  const select = $("model");
  const chosen = select.value;
  select.replaceChildren();
  for (const card of (await resp.json()).data) {
    const option = document.createElement("option");
    option.value = card.id;
    option.textContent = card.context_length ? `${card.id} (${card.context_length} tokens)` : card.id;
    select.append(option);
  }
  if (chosen) select.value = chosen;
  say("");
}

async function pollGauges() {
  try {
    const resp = await fetch("/load", { headers: headers() });
    if (resp.ok) {
      const load = await resp.json();
      const kv = Object.values(load.kv_cache_usage).map((share) => `${(share * 100).toFixed(0)}%`);
      $("gauges").textContent =
        `running ${load.running} · waiting ${load.waiting}` + (kv.length ? ` · KV ${kv.join(" ")}` : "");
    }
  } catch {
    // the server is restarting or gone: the next poll says so when it answers
  }
}

function number(id) {
  const text = $(id).value.trim();
  return text === "" ? undefined : Number(text);
}

function json(id, what) {
  const text = $(id).value.trim();
  if (!text) return undefined;
  try {
    return JSON.parse(text);
  } catch (error) {
    throw new Error(`${what} is not JSON: ${error.message}`);
  }
}

function request(messages) {
  const body = {
    model: $("model").value,
    messages,
    stream: true,
    stream_options: { include_usage: true },
    temperature: number("temperature"),
    top_p: number("top_p"),
    max_tokens: number("max_tokens"),
    seed: number("seed"),
  };
  const stops = $("stop_strings").value.split("\n").filter((line) => line !== "");
  if (stops.length) body.stop = stops;
  const schema = json("schema", "the JSON schema");
  if (schema) body.response_format = { type: "json_schema", json_schema: { name: "answer", schema, strict: true } };
  const tools = json("tools", "the tools");
  if (tools) body.tools = tools;
  return body;
}

function bubble(role, text) {
  const item = document.createElement("li");
  item.className = role;
  const content = document.createElement("div");
  content.className = "text";
  content.textContent = text;
  item.append(content);
  $("turns").append(item);
  item.scrollIntoView({ block: "nearest" });
  return item;
}

function part(item, className) {
  let found = item.querySelector(`.${className}`);
  if (!found) {
    found = document.createElement("div");
    found.className = className;
    item.insertBefore(found, item.querySelector(".text"));
  }
  return found;
}

function ms(value) {
  return value == null ? "–" : `${value.toFixed(1)} ms`;
}

function figuresLine(metrics, finish) {
  const cached = metrics.cached_prompt_tokens ? ` (cached ${metrics.cached_prompt_tokens})` : "";
  const rate = metrics.tokens_per_second == null ? "–" : metrics.tokens_per_second.toFixed(1);
  return (
    `queue ${ms(metrics.queue_time_ms)} · TTFT ${ms(metrics.time_to_first_token_ms)} · ` +
    `TPOT ${ms(metrics.time_per_output_token_ms)} · ${rate} tok/s · prompt ${metrics.prompt_tokens}${cached} · ` +
    `${metrics.completion_tokens} generated · finish ${finish || "–"}`
  );
}

async function* events(resp) {
  // The SSE stream's data payloads, as they arrive.
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffered = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffered += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffered.indexOf("\n\n")) >= 0) {
      const block = buffered.slice(0, end);
      buffered = buffered.slice(end + 2);
      for (const line of block.split("\n")) {
        if (line.startsWith("data: ")) yield line.slice(6);
      }
    }
  }
}

async function send(event) {
  event.preventDefault();
  const prompt = $("prompt").value;
  if (!prompt.trim() || running) return;
  let body;
  const system = $("system").value.trim();
  const messages = [...(system ? [{ role: "system", content: system }] : []), ...conversation];
  messages.push({ role: "user", content: prompt });
  try {
    body = request(messages);
  } catch (error) {
    say(error.message, true);
    return;
  }
  bubble("user", prompt);
  $("prompt").value = "";
  const answer = bubble("assistant", "");
  answer.dataset.state = "streaming";
  running = new AbortController();
  $("send").disabled = true;
  $("stop").disabled = false;
  say("generating…");
  const calls = [];
  let text = "";
  let finish = null;
  try {
    const resp = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: headers(),
      body: JSON.stringify(body),
      signal: running.signal,
    });
    if (!resp.ok) throw new Error(await errorText(resp));
    for await (const data of events(resp)) {
      if (data === "[DONE]") break;
      const chunk = JSON.parse(data);
      if (chunk.error) throw new Error(chunk.error.message);
      for (const choice of chunk.choices || []) {
        const delta = choice.delta || {};
        const thought = delta.reasoning_content || delta.reasoning;
        if (thought) part(answer, "thinking").textContent += thought;
        if (delta.content) {
          text += delta.content;
          answer.querySelector(".text").textContent = text;
        }
        for (const call of delta.tool_calls || []) {
          calls[call.index] = calls[call.index] || { name: "", arguments: "" };
          if (call.function.name) calls[call.index].name = call.function.name;
          calls[call.index].arguments += call.function.arguments || "";
          part(answer, "calls").textContent = calls.map((c) => `${c.name}(${c.arguments})`).join("\n");
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      }
      if (chunk.metrics) {
        const figures = document.createElement("div");
        figures.className = "figures";
        figures.textContent = figuresLine(chunk.metrics, finish);
        answer.append(figures);
        turns.push({ ttft: chunk.metrics.time_to_first_token_ms, rate: chunk.metrics.tokens_per_second });
        draw();
      }
    }
    conversation.push({ role: "user", content: prompt }, { role: "assistant", content: text });
    say("");
  } catch (error) {
    if (error.name === "AbortError") {
      say("stopped: the server cancelled the generation");
    } else {
      const shown = document.createElement("div");
      shown.className = "error";
      shown.textContent = error.message;
      answer.append(shown);
      say("");
    }
  } finally {
    answer.dataset.state = "done";
    addCopy(answer, () => text);
    running = null;
    $("send").disabled = false;
    $("stop").disabled = true;
  }
}

function addCopy(item, text) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = "copy";
  button.textContent = "copy";
  button.addEventListener("click", () => navigator.clipboard.writeText(text()).catch(() => say("copy refused", true)));
  item.prepend(button);
}

function draw() {
  const canvas = $("chart");
  const context = canvas.getContext("2d");
  const { width, height } = canvas;
  context.clearRect(0, 0, width, height);
  context.font = "11px system-ui";
  context.fillStyle = "#6b7280";
  context.fillText(turns.length ? `${turns.length} turns` : "no turns yet", 8, 14);
  if (turns.length === 0) return;
  const series = [
    { key: "ttft", color: "#2563eb" },
    { key: "rate", color: "#16a34a" },
  ];
  const step = turns.length > 1 ? (width - 40) / (turns.length - 1) : 0;
  for (const { key, color } of series) {
    const values = turns.map((turn) => turn[key] || 0);
    const most = Math.max(...values, 1);
    context.strokeStyle = color;
    context.fillStyle = color;
    context.beginPath();
    values.forEach((value, i) => {
      const x = 20 + i * step;
      const y = height - 20 - (value / most) * (height - 40);
      if (i === 0) context.moveTo(x, y);
      else context.lineTo(x, y);
      context.fillRect(x - 2, y - 2, 4, 4);
    });
    context.stroke();
    context.fillText(`max ${most.toFixed(1)}`, key === "ttft" ? width - 150 : width - 75, 14);
  }
}

function stop() {
  if (running) running.abort();
}

function clear() {
  stop();
  conversation.length = 0;
  turns.length = 0;
  $("turns").replaceChildren();
  draw();
  say("");
}

document.addEventListener("DOMContentLoaded", () => {
  $("composer").addEventListener("submit", send);
  $("stop").addEventListener("click", stop);
  $("clear").addEventListener("click", clear);
  $("api-key").addEventListener("change", loadModels);
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) send(event);
  });
  loadModels();
  draw();
  pollGauges();
  setInterval(pollGauges, 1000);
});
