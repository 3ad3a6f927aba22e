// The chat page: talks to this server's own OpenAI-compatible API, streaming each reply as server-sent events.
// A chat run gets the conversation (/v1/chat/completions); a base model continues the text (/v1/completions).
"use strict";

const $ = (id) => document.getElementById(id);
const state = { model: null, chat: false, messages: [], controller: null, key: null };

function showError(text) {
  $("error").textContent = text;
  $("error").hidden = !text;
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = `message ${role}`;
  div.textContent = text;
  $("conversation").appendChild(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

function headers() {
  const h = { "Content-Type": "application/json" };
  if (state.key) h.Authorization = `Bearer ${state.key}`;
  return h;
}

async function askKey() {
  $("key").value = "";
  $("key-dialog").showModal();
  await new Promise((resolve) => $("key-dialog").addEventListener("close", resolve, { once: true }));
  state.key = $("key").value;
  return Boolean(state.key);  // Esc or an empty key: give up, and show the server's refusal
}

async function api(path, options = {}) {
  for (;;) {
    const response = await fetch(path, { ...options, headers: headers() });
    if (response.status !== 401 || !(await askKey())) return response;
  }
}

async function refusal(response) {
  try {
    const body = await response.json();
    return body.error.message;
  } catch {
    return `the server answered ${response.status}`;
  }
}

async function load() {
  const response = await api("/v1/models");
  if (!response.ok) return showError(await refusal(response));
  const card = (await response.json()).data[0];
  state.model = card.id;
  state.chat = card.chat;
  $("title").textContent = card.id;
  $("max-tokens").value = Math.min(200, Math.floor(card.max_model_len / 2));  // the rest holds the conversation
  $("mode").textContent = card.chat ? `chat · context ${card.max_model_len} tokens`
                                    : `text continuation · context ${card.max_model_len} tokens`;
  $("input").placeholder = card.chat ? "Type a message; Enter sends, Shift+Enter is a new line"
                                     : "Type the start of a text; Enter continues it";
}

function setBusy(busy) {
  $("send").hidden = busy;
  $("stop").hidden = !busy;
  $("input").disabled = busy;
}

async function send(text) {
  showError("");
  const settings = { model: state.model, stream: true, temperature: Number($("temperature").value),
                     max_tokens: Number($("max-tokens").value) };
  let path, body;
  const asked = addMessage("user", text);
  if (state.chat) {
    state.messages.push({ role: "user", content: text });
    path = "/v1/chat/completions";
    body = { ...settings, messages: state.messages };
  } else {
    path = "/v1/completions";
    body = { ...settings, prompt: text };
  }
  const reply = addMessage("assistant", "");
  reply.classList.add("streaming");
  state.controller = new AbortController();
  setBusy(true);
  try {
    const response = await api(path, { method: "POST", body: JSON.stringify(body), signal: state.controller.signal });
    if (!response.ok) {  // refused: the message goes back to the input, to be said another way
      reply.remove();
      asked.remove();
      if (state.chat) state.messages.pop();
      $("input").value = text;
      return showError(await refusal(response));
    }
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      const events = buffer.split("\n\n");
      buffer = events.pop();
      for (const event of events) {
        const data = event.replace(/^data: /, "");
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        const choice = chunk.choices[0];
        reply.textContent += state.chat ? (choice.delta.content || "") : choice.text;
        reply.scrollIntoView({ block: "end" });
      }
    }
  } catch (e) {
    if (e.name !== "AbortError") showError(e.message);
  } finally {
    reply.classList.remove("streaming");
    if (!reply.textContent) reply.remove();  // stopped before a word: nothing to keep
    if (state.chat && reply.isConnected) state.messages.push({ role: "assistant", content: reply.textContent });
    state.controller = null;
    setBusy(false);
    $("input").focus();
  }
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("input").value;
  if (!text.trim() || state.controller) return;
  $("input").value = "";
  send(text);
});
$("input").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});
$("stop").addEventListener("click", () => state.controller && state.controller.abort());
$("clear").addEventListener("click", () => {
  if (state.controller) state.controller.abort();
  state.messages = [];
  $("conversation").replaceChildren();
  showError("");
});
load();
