// geode chat page: keeps the conversation in memory, streams replies over SSE from
// /v1/chat/completions, and can stop a reply (aborting the fetch cancels it on the server).
// Attached images go as OpenAI `image_url` parts holding data: URLs (a VLM reads them; other
// models answer 400, shown in the reply's place).
"use strict";
const $ = (id) => document.getElementById(id);
const log = $("log"), input = $("input"), send = $("send"), stop = $("stop");
let messages = [];      // the conversation: {role, content}; content is a string or parts
let pending = [];       // data: URLs of the images attached to the next message
let controller = null;  // AbortController of the reply being streamed
let modelName = null;

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("apikey").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function thumb(url) {
  const img = document.createElement("img");
  img.className = "thumb";
  img.src = url;
  img.alt = "attached image";
  return img;
}

function bubble(role, text, images = []) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  const label = document.createElement("span");
  label.className = "role";
  label.textContent = role;
  const body = document.createElement("span");
  body.className = "body";
  body.textContent = text;
  div.append(label);
  if (images.length) {
    const row = document.createElement("div");
    row.className = "images";
    row.append(...images.map(thumb));
    div.append(row);
  }
  div.append(body);
  log.append(div);
  log.scrollTop = log.scrollHeight;
  return body;
}

async function loadModel() {
  try {
    const r = await fetch("/v1/models", { headers: headers() });
    const j = await r.json();
    if (r.ok && j.data && j.data.length) { modelName = j.data[0].id; $("model").textContent = modelName; }
    else $("model").textContent = (j.error && j.error.message) || "unavailable";
  } catch (e) { $("model").textContent = "unavailable"; }
}

function settings() {
  const num = (id) => { const v = $(id).value; return v === "" ? undefined : Number(v); };
  const s = { temperature: num("temperature"), top_p: num("top_p"), top_k: num("top_k"),
              max_tokens: num("max_tokens"), seed: num("seed") };
  Object.keys(s).forEach((k) => s[k] === undefined && delete s[k]);
  return s;
}

function showAttachments() {
  const box = $("attachments");
  box.textContent = "";
  pending.forEach((url, i) => {
    const img = thumb(url);
    img.title = "Remove this image";
    img.addEventListener("click", () => { pending.splice(i, 1); showAttachments(); });
    box.append(img);
  });
}

function readDataURL(file) {
  return new Promise((resolve, reject) => {
    const r = new FileReader();
    r.onload = () => resolve(r.result);
    r.onerror = () => reject(r.error);
    r.readAsDataURL(file);
  });
}

async function sendMessage(text, images) {
  const parts = images.map((url) => ({ type: "image_url", image_url: { url } }));
  if (text) parts.push({ type: "text", text });
  const user = { role: "user", content: images.length ? parts : text };
  messages.push(user);
  const mine = bubble("user", text, images);
  const out = bubble("assistant", "");
  const sys = $("system").value.trim();
  const convo = sys ? [{ role: "system", content: sys }, ...messages] : messages;
  const body = { model: modelName || undefined, messages: convo, stream: true,
                 stream_options: { include_usage: true }, ...settings() };
  controller = new AbortController();
  send.disabled = true; stop.disabled = false;
  let reply = "", started = performance.now(), first = null, tokens = 0, refused = false;
  try {
    const r = await fetch("/v1/chat/completions", { method: "POST", headers: headers(),
                                                   body: JSON.stringify(body), signal: controller.signal });
    if (!r.ok) {
      const j = await r.json().catch(() => ({}));
      refused = true;  // the server took nothing: the message leaves the conversation
      throw new Error(`HTTP ${r.status}: ` + ((j.error && j.error.message) || r.statusText));
    }
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      let i;
      while ((i = buf.indexOf("\n\n")) >= 0) {
        const event = buf.slice(0, i); buf = buf.slice(i + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") continue;
          const chunk = JSON.parse(data);
          if (chunk.error) throw new Error(chunk.error.message);
          if (chunk.usage) tokens = chunk.usage.completion_tokens;
          for (const c of chunk.choices || []) {
            const piece = (c.delta && c.delta.content) || "";
            if (piece) { if (first === null) first = performance.now(); reply += piece; out.textContent = reply; }
            if (c.delta && c.delta.tool_calls) {
              reply += c.delta.tool_calls.map((t) => `[tool call ${t.function.name}(${t.function.arguments})]`).join("\n");
              out.textContent = reply;
            }
          }
          log.scrollTop = log.scrollHeight;
        }
      }
    }
  } catch (e) {
    if (e.name !== "AbortError") { out.parentElement.className = "msg error"; out.textContent = reply + "\n[error] " + e.message; }
    else out.textContent = reply + " [stopped]";
  } finally {
    if (refused) { messages.splice(messages.indexOf(user), 1); mine.parentElement.classList.add("refused"); }
    else messages.push({ role: "assistant", content: reply });
    const secs = (performance.now() - started) / 1000;
    $("stats").textContent = `${tokens || "?"} tokens in ${secs.toFixed(2)} s` +
      (first !== null ? `, first token after ${((first - started) / 1000).toFixed(2)} s` : "");
    controller = null; send.disabled = false; stop.disabled = true;
    input.focus();
  }
}

$("composer").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = input.value.trim();
  if ((!text && !pending.length) || controller) return;
  const images = pending;
  input.value = ""; pending = []; showAttachments();
  sendMessage(text, images);
});
$("attach-button").addEventListener("click", () => $("attach").click());
$("attach").addEventListener("change", async (ev) => {
  for (const file of ev.target.files) pending.push(await readDataURL(file));
  ev.target.value = "";
  showAttachments();
});
input.addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); $("composer").requestSubmit(); }
});
stop.addEventListener("click", () => controller && controller.abort());
$("clear").addEventListener("click", () => { if (controller) controller.abort(); messages = []; pending = []; showAttachments(); log.textContent = ""; });
$("apikey").addEventListener("change", loadModel);
loadModel();
