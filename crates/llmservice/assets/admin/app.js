// The llmservice dashboard: five pages over the operator's JSON API
// (/admin/api), called with the operator's key. No build step, no framework:
// every element is built with textContent (never innerHTML), so nothing a
// model, a file or a key name holds can become markup.
"use strict";

(() => {
  const KEY_STORE = "llmservice.key";
  const REFRESH_MS = { status: 5000, models: 5000, analytics: 10000, settings: 10000 };

  const app = { key: null, page: null, timer: null, charts: {}, chat: [], abort: null, watching: new Set() };

  // ---------- DOM ----------

  const $ = (id) => document.getElementById(id);

  function h(tag, attrs, ...children) {
    const el = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (value === undefined || value === null || value === false) continue;
      if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
      else if (name === "class") el.className = value;
      else if (name === "text") el.textContent = value;
      // Through the CSSOM: the page's CSP refuses inline style attributes.
      else if (name === "style") el.style.cssText = value;
      else el.setAttribute(name, value === true ? "" : value);
    }
    for (const child of children.flat()) {
      if (child === undefined || child === null || child === false) continue;
      el.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return el;
  }

  function table(columns, rows, empty) {
    if (!rows.length) return h("div", { class: "table-wrap" }, h("div", { class: "empty", text: empty }));
    return h("div", { class: "table-wrap" },
      h("table", {},
        h("thead", {}, h("tr", {}, columns.map((c) => h("th", { text: c })))),
        h("tbody", {}, rows.map((cells) => h("tr", {}, cells.map((cell) =>
          cell instanceof Node && cell.tagName === "TD" ? cell : h("td", {}, cell)))))));
  }

  function stat(label, value, sub) {
    return h("div", { class: "stat" },
      h("div", { class: "label", text: label }),
      h("div", { class: "value", text: value }),
      sub ? h("div", { class: "sub", text: sub }) : null);
  }

  const badge = (text) => h("span", { class: `badge ${text}`, text });

  // ---------- formatting ----------

  function fmtBytes(n) {
    if (n === null || n === undefined) return "—";
    const units = ["B", "KB", "MB", "GB", "TB"];
    let i = 0;
    while (n >= 1000 && i < units.length - 1) { n /= 1000; i += 1; }
    return `${n.toFixed(i === 0 ? 0 : 1)} ${units[i]}`;
  }
  const fmtNum = (n, digits = 0) => (n === null || n === undefined ? "—"
    : Number(n).toLocaleString(undefined, { maximumFractionDigits: digits, minimumFractionDigits: digits }));
  const fmtMs = (ms) => (ms === null || ms === undefined ? "—" : ms >= 1000 ? `${(ms / 1000).toFixed(2)} s` : `${ms.toFixed(0)} ms`);
  function fmtDuration(s) {
    const d = Math.floor(s / 86400), hh = Math.floor((s % 86400) / 3600), m = Math.floor((s % 3600) / 60);
    return d ? `${d}d ${hh}h` : hh ? `${hh}h ${m}m` : `${m}m ${Math.floor(s % 60)}s`;
  }
  const fmtTime = (t) => (t ? new Date(t * 1000).toLocaleString() : "—");
  const fmtParams = (n) => (n >= 1e9 ? `${(n / 1e9).toFixed(1)}B` : `${(n / 1e6).toFixed(0)}M`);

  // ---------- the API ----------

  class ApiError extends Error {
    constructor(status, message) { super(message); this.status = status; }
  }

  async function errorOf(response) {
    let message = `${response.status} ${response.statusText}`;
    try {
      const body = await response.json();
      message = (body.error && (body.error.message || body.error)) || message;
    } catch (_) { /* not JSON */ }
    return new ApiError(response.status, message);
  }

  async function api(path, options = {}) {
    const init = { method: options.method || "GET", headers: { Authorization: `Bearer ${app.key}` } };
    if (options.body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(options.body);
    }
    if (options.signal) init.signal = options.signal;
    const response = await fetch(path, init);
    if (response.status === 401 && !options.probe) signOut("Your key was not accepted; sign in again.");
    if (!response.ok) throw await errorOf(response);
    return response.json();
  }

  // Server-sent events over fetch (EventSource cannot send the key): calls
  // onData with each event's data until the stream ends or is aborted.
  async function streamEvents(path, init, onData) {
    const response = await fetch(path, init);
    if (!response.ok) throw await errorOf(response);
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true }).replace(/\r\n/g, "\n");
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        const data = event.split("\n").filter((l) => l.startsWith("data:"))
          .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
        if (data) onData(data);
      }
    }
  }

  // ---------- signing in ----------

  function savedKey() {
    return sessionStorage.getItem(KEY_STORE) || localStorage.getItem(KEY_STORE);
  }

  async function signIn(key, remember) {
    app.key = key;
    try {
      await api("/admin/api/status", { probe: true });
    } catch (error) {
      app.key = null;
      if (error.status === 403) throw new Error("This is a named key: the dashboard needs the operator's key.");
      if (error.status === 401) throw new Error("That is not the operator's key.");
      throw error;
    }
    sessionStorage.setItem(KEY_STORE, key);
    if (remember) localStorage.setItem(KEY_STORE, key);
    $("login").hidden = true;
    $("logout").hidden = false;
    route();
  }

  function signOut(message) {
    app.key = null;
    sessionStorage.removeItem(KEY_STORE);
    localStorage.removeItem(KEY_STORE);
    stopTimer();
    document.querySelectorAll(".page").forEach((p) => { p.hidden = true; });
    $("logout").hidden = true;
    $("login").hidden = false;
    $("login-error").textContent = message || "";
    $("key").focus();
  }

  $("login-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    $("login-error").textContent = "";
    try {
      await signIn($("key").value.trim(), $("remember").checked);
      $("key").value = "";
    } catch (error) {
      $("login-error").textContent = error.message;
    }
  });
  $("logout").addEventListener("click", () => signOut());

  // ---------- pages ----------

  const pages = {
    status: { render: renderStatus },
    models: { render: renderModels, enter: enterModels },
    playground: { enter: enterPlayground },
    analytics: { render: renderAnalytics, enter: enterAnalytics },
    settings: { render: renderSettings },
  };

  function stopTimer() {
    if (app.timer) clearInterval(app.timer);
    app.timer = null;
  }

  function route() {
    if (!app.key) return;
    const name = pages[location.hash.slice(1)] ? location.hash.slice(1) : "status";
    app.page = name;
    document.querySelectorAll(".page").forEach((p) => { p.hidden = p.id !== `page-${name}`; });
    document.querySelectorAll("#nav a").forEach((a) => a.classList.toggle("active", a.dataset.page === name));
    stopTimer();
    const page = pages[name];
    if (page.enter) page.enter();
    if (page.render) {
      refresh(page);
      app.timer = setInterval(() => { if (!document.hidden) refresh(page); }, REFRESH_MS[name] || 5000);
    }
  }

  async function refresh(page) {
    try {
      await page.render();
    } catch (error) {
      if (error.status !== 401) console.warn(error);
    }
  }

  window.addEventListener("hashchange", route);

  // ---------- Status ----------

  async function renderStatus() {
    const s = await api("/admin/api/status");
    const hour = s.last_hour;
    $("status-cards").replaceChildren(
      stat("Version", s.version, `up ${fmtDuration(s.uptime_seconds)}`),
      stat("Memory", fmtBytes(s.rss_bytes), "resident, whole process"),
      stat("Models", `${s.loaded.length} loaded`, `${s.models_available} available`),
      stat("Requests (1 h)", fmtNum(hour.requests), `${fmtNum(hour.errors)} errors`),
      stat("Generated (1 h)", fmtNum(hour.completion_tokens), `${fmtNum(hour.decode_tokens_per_s, 1)} tok/s per stream`),
      stat("Time to first token", fmtMs(hour.ttft_p50_ms), `p95 ${fmtMs(hour.ttft_p95_ms)}`),
      stat("Cache hit rate", s.cache_hit_rate === null ? "—" : `${(s.cache_hit_rate * 100).toFixed(0)}%`,
        `${fmtNum(s.cache.entries)} entries, ${fmtBytes(s.cache.bytes)}`),
    );
    $("status-models").replaceChildren(table(
      ["Model", "Kind", "State", "Weights", "Params", "Context", "Slots", "Active", "Waiting", "Idle"],
      s.loaded.map((m) => [m.id, m.kind, badge(m.state), fmtBytes(m.size_bytes), fmtParams(m.n_params),
        fmtNum(m.n_ctx), m.parallel, m.active, m.waiting, fmtDuration(m.idle_seconds)]),
      "No model is loaded: models load on their first request, or from the Models page."));
    $("status-collections").replaceChildren(s.collections_error
      ? h("p", { class: "error", text: s.collections_error })
      : table(["Collection", "Embedding model", "Documents", "Chunks", "Size"],
        s.collections.map((c) => [c.name, c.embedding_model, fmtNum(c.documents), fmtNum(c.chunks), fmtBytes(c.bytes)]),
        "No retrieval collections yet (POST /v1/rag/documents creates one)."));
  }

  // ---------- Models ----------

  let openSettingsId = null;

  async function renderModels() {
    const [models, downloads] = await Promise.all([api("/admin/api/models"), api("/admin/api/downloads")]);
    $("models-table").replaceChildren(table(
      ["Model", "Tier", "Kind", "State", "File", "Size", ""],
      models.map((m) => [
        h("td", { class: "wrap" }, m.id, m.reload_needed ? h("div", { class: "muted", text: "settings changed: reload to apply" }) : null,
          m.error ? h("div", { class: "error", text: m.error }) : null),
        m.tier || "—", m.kind, badge(m.state), h("td", { class: "wrap", text: m.file }), fmtBytes(m.size_bytes),
        h("div", { class: "actions" },
          m.state === "loaded"
            ? h("button", { class: "secondary", type: "button", onclick: () => modelAction(m.id, "unload"), text: "Unload" })
            : h("button", { type: "button", onclick: () => modelAction(m.id, "load"), disabled: m.state === "loading", text: m.state === "loading" ? "Loading…" : "Load" }),
          h("button", { class: "secondary", type: "button", onclick: () => showSettings(m), text: "Settings" })),
      ]),
      "No models: put .gguf files in the models directory, or download one below."));
    renderDownloads(downloads.data);
    if (openSettingsId) {
      const current = models.find((m) => m.id === openSettingsId);
      if (!current) hideSettings();
    }
  }

  function enterModels() {
    $("download-error").textContent = "";
  }

  async function modelAction(id, action) {
    const path = `/admin/api/models/${id.split("/").map(encodeURIComponent).join("/")}/${action}`;
    const promise = api(path, { method: "POST" });
    if (action === "load") setTimeout(() => refresh(pages.models), 300);
    try {
      await promise;
    } catch (error) {
      alert(`${action} failed: ${error.message}`);
    }
    refresh(pages.models);
  }

  const SETTINGS_FIELDS = [
    ["n_ctx", "Context (tokens)", "int", true], ["n_threads", "Threads", "int", true],
    ["parallel", "Parallel slots", "int", true], ["n_gpu_layers", "GPU layers (-1 all)", "int", true],
    ["temperature", "Temperature", "float"], ["top_p", "Top p", "float"], ["top_k", "Top k", "int"],
    ["min_p", "Min p", "float"], ["repeat_penalty", "Repeat penalty", "float"], ["max_tokens", "Max tokens", "int"],
  ];

  function hideSettings() {
    openSettingsId = null;
    $("model-settings").hidden = true;
  }

  function showSettings(model) {
    openSettingsId = model.id;
    const panel = $("model-settings");
    const inputs = {};
    const error = h("p", { class: "error", role: "alert" });
    const fields = SETTINGS_FIELDS.map(([name, label, kind, engine]) => {
      inputs[name] = h("input", {
        id: `set-${name}`, type: "number", step: kind === "int" ? "1" : "any",
        placeholder: String(model.settings[name]), value: model.overrides[name] ?? "",
      });
      return h("div", {}, h("label", { for: `set-${name}`, text: `${label}${engine ? " *" : ""}` }), inputs[name]);
    });
    const save = async (event) => {
      event.preventDefault();
      const body = {};
      for (const [name, , kind] of SETTINGS_FIELDS) {
        const raw = inputs[name].value.trim();
        if (raw !== "") body[name] = kind === "int" ? parseInt(raw, 10) : parseFloat(raw);
      }
      try {
        await api(`/admin/api/models/${model.id.split("/").map(encodeURIComponent).join("/")}/settings`, { method: "PUT", body });
        hideSettings();
        refresh(pages.models);
      } catch (e) {
        error.textContent = e.message;
      }
    };
    panel.replaceChildren(h("form", { onsubmit: save },
      h("h2", { text: `Settings of ${model.id}` }),
      h("p", { class: "muted", text: "Empty fields keep the configured value (shown greyed). * applies at the next load; sampling defaults apply at once." }),
      h("div", { class: "settings-grid" }, fields),
      error,
      h("div", { class: "row" },
        h("button", { type: "submit", text: "Save" }),
        h("button", { type: "button", class: "secondary", onclick: () => { for (const i of Object.values(inputs)) i.value = ""; }, text: "Clear overrides" }),
        h("button", { type: "button", class: "secondary", onclick: hideSettings, text: "Close" }))));
    panel.hidden = false;
    panel.scrollIntoView({ behavior: "smooth", block: "nearest" });
  }

  function renderDownloads(list) {
    $("downloads").replaceChildren(list.length ? table(
      ["Repository", "Files", "State", "Progress", ""],
      list.map((d) => {
        const pct = d.total_bytes ? Math.min(100, (100 * d.done_bytes) / d.total_bytes) : 0;
        return [
          d.repo, h("td", { class: "wrap", text: d.files.join(", ") }),
          h("td", {}, badge(d.status), d.error ? h("div", { class: "error wrap", text: d.error }) : null,
            d.model ? h("div", { class: "muted", text: `model: ${d.model}` }) : null),
          h("td", {}, h("div", { class: "progress", role: "progressbar", "aria-valuenow": pct.toFixed(0) },
            h("div", { style: `width: ${pct.toFixed(1)}%` })),
          h("div", { class: "muted", text: `${fmtBytes(d.done_bytes)} of ${fmtBytes(d.total_bytes)}` })),
          d.status === "running"
            ? h("button", { class: "danger", type: "button", onclick: () => cancelDownload(d.id), text: "Cancel" }) : "",
        ];
      }), "") : "");
    for (const d of list) if (d.status === "running") watchDownload(d.id);
  }

  // Follows a running download's events so its bar moves between refreshes.
  async function watchDownload(id) {
    if (app.watching.has(id)) return;
    app.watching.add(id);
    try {
      await streamEvents(`/admin/api/downloads/${encodeURIComponent(id)}/events`,
        { headers: { Authorization: `Bearer ${app.key}` } }, () => {
          if (app.page === "models") refresh(pages.models);
        });
    } catch (_) { /* the next refresh shows the state */ }
    app.watching.delete(id);
    if (app.page === "models") refresh(pages.models);
  }

  async function cancelDownload(id) {
    try {
      await api(`/admin/api/downloads/${encodeURIComponent(id)}`, { method: "DELETE" });
    } catch (error) {
      $("download-error").textContent = error.message;
    }
    refresh(pages.models);
  }

  $("download-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    $("download-error").textContent = "";
    const body = { model: $("download-model").value.trim() };
    const quant = $("download-quant").value.trim();
    if (quant) body.quant = quant;
    try {
      const started = await api("/admin/api/downloads", { method: "POST", body });
      $("download-model").value = "";
      $("download-quant").value = "";
      watchDownload(started.id);
      refresh(pages.models);
    } catch (error) {
      $("download-error").textContent = error.message;
    }
  });

  // ---------- Playground ----------

  async function enterPlayground() {
    const select = $("play-model");
    const chosen = select.value;
    try {
      const models = (await api("/admin/api/models")).filter((m) => m.kind === "chat");
      select.replaceChildren(...models.map((m) => h("option", { value: m.id, text: `${m.id} (${m.state})` })));
      if (models.some((m) => m.id === chosen)) select.value = chosen;
      $("chat-send").disabled = !models.length;
      if (!models.length) $("play-stats").textContent = "No chat model: add one on the Models page.";
    } catch (error) {
      $("play-stats").textContent = error.message;
    }
    renderTranscript();
  }

  $("play-json").addEventListener("change", (e) => { $("play-schema").hidden = !e.target.checked; });
  $("play-tools").addEventListener("change", (e) => { $("play-tools-json").hidden = !e.target.checked; });
  $("play-clear").addEventListener("click", () => { app.chat = []; renderTranscript(); $("play-stats").textContent = ""; });

  function renderTranscript() {
    const box = $("transcript");
    box.replaceChildren(...app.chat.map((m) => h("div", { class: `msg ${m.role}` },
      h("div", { class: "who", text: m.role }),
      // A thinking model's thoughts: open while it is still thinking.
      m.reasoning ? h("details", { class: "thinking", open: !m.content && !(m.tool_calls || []).length },
        h("summary", { text: "Thinking" }), h("div", { class: "text", text: m.reasoning })) : null,
      m.content ? h("div", { class: "text", text: m.content }) : null,
      (m.tool_calls || []).map((c) => h("pre", { text: `${c.function.name}(${c.function.arguments})` })))));
    box.scrollTop = box.scrollHeight;
  }

  function playgroundRequest() {
    const messages = [];
    const system = $("play-system").value.trim();
    if (system) messages.push({ role: "system", content: system });
    for (const m of app.chat) {
      const message = { role: m.role, content: m.content || "" };
      if (m.tool_calls && m.tool_calls.length) message.tool_calls = m.tool_calls;
      if (m.reasoning) message.reasoning_content = m.reasoning;
      messages.push(message);
    }
    const body = {
      model: $("play-model").value, messages, stream: true, stream_options: { include_usage: true },
      temperature: parseFloat($("play-temperature").value), max_tokens: parseInt($("play-max-tokens").value, 10),
      top_p: parseFloat($("play-top-p").value),
    };
    if ($("play-json").checked) {
      body.response_format = { type: "json_schema", json_schema: { name: "playground", schema: JSON.parse($("play-schema").value), strict: true } };
    }
    if ($("play-tools").checked) body.tools = JSON.parse($("play-tools-json").value);
    return body;
  }

  $("chat-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const text = $("chat-input").value.trim();
    if (!text || app.abort) return;
    let body;
    app.chat.push({ role: "user", content: text });
    try {
      body = playgroundRequest();
    } catch (error) {
      app.chat.pop();
      $("play-stats").textContent = `The schema or tools are not valid JSON: ${error.message}`;
      return;
    }
    $("chat-input").value = "";
    const reply = { role: "assistant", content: "", reasoning: "", tool_calls: [] };
    app.chat.push(reply);
    renderTranscript();
    app.abort = new AbortController();
    $("chat-send").hidden = true;
    $("chat-stop").hidden = false;
    const sent = performance.now();
    let first = null;
    let usage = null;
    let finish = null;
    $("play-stats").textContent = "waiting for the first token…";
    try {
      await streamEvents("/v1/chat/completions", {
        method: "POST", signal: app.abort.signal,
        headers: { Authorization: `Bearer ${app.key}`, "Content-Type": "application/json" },
        body: JSON.stringify(body),
      }, (data) => {
        if (data === "[DONE]") return;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        if (chunk.usage) usage = chunk.usage;
        for (const choice of chunk.choices || []) {
          const delta = choice.delta || {};
          if (delta.content || delta.reasoning_content || delta.tool_calls) first = first || performance.now();
          if (delta.reasoning_content) reply.reasoning += delta.reasoning_content;
          if (delta.content) reply.content += delta.content;
          for (const call of delta.tool_calls || []) {
            const slot = reply.tool_calls[call.index] || (reply.tool_calls[call.index] = { id: call.id, type: "function", function: { name: "", arguments: "" } });
            if (call.function && call.function.name) slot.function.name += call.function.name;
            if (call.function && call.function.arguments) slot.function.arguments += call.function.arguments;
          }
          if (choice.finish_reason) finish = choice.finish_reason;
        }
        renderTranscript();
        if (first) $("play-stats").textContent = `first token ${fmtMs(first - sent)}`;
      });
      const end = performance.now();
      const tokens = usage ? usage.completion_tokens : null;
      const rate = tokens && first && end > first && tokens > 1 ? ((tokens - 1) * 1000) / (end - first) : null;
      $("play-stats").textContent = [
        `first token ${first ? fmtMs(first - sent) : "—"}`,
        tokens !== null ? `${tokens} tokens` : null,
        rate ? `${rate.toFixed(1)} tok/s` : null,
        finish ? `finish: ${finish}` : null,
      ].filter(Boolean).join(" · ");
    } catch (error) {
      $("play-stats").textContent = error.name === "AbortError" ? "stopped" : `error: ${error.message}`;
      if (!reply.content && !reply.reasoning && !reply.tool_calls.length) app.chat.pop();
    } finally {
      app.abort = null;
      $("chat-send").hidden = false;
      $("chat-stop").hidden = true;
      renderTranscript();
    }
  });
  $("chat-stop").addEventListener("click", () => { if (app.abort) app.abort.abort(); });
  $("chat-input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("chat-form").requestSubmit(); }
  });

  // ---------- Analytics ----------

  const COLORS = ["#2f6fed", "#e5484d", "#12a594", "#f76b15"];

  function enterAnalytics() {
    for (const id of ["an-range", "an-model", "an-key"]) $(id).onchange = () => refresh(pages.analytics);
  }

  function fillSelect(select, all, options) {
    const chosen = select.value;
    select.replaceChildren(h("option", { value: "", text: all }),
      ...options.map(([value, text]) => h("option", { value, text })));
    if (options.some(([v]) => v === chosen)) select.value = chosen;
  }

  function chart(id, series, data) {
    const el = $(id);
    const width = Math.max(260, el.clientWidth);
    const old = app.charts[id];
    if (old && old.series.length === series.length + 1) {
      old.setData(data);
      if (Math.abs(old.width - width) > 4) old.setSize({ width, height: 220 });
      return;
    }
    if (old) old.destroy();
    app.charts[id] = new uPlot({
      width, height: 220,
      series: [{}, ...series.map(([label], i) => ({ label, stroke: COLORS[i], width: 2, spanGaps: true, points: { show: true, size: 4 } }))],
      axes: [{}, { size: 60 }],
      scales: { y: { range: (u, min, max) => [0, Math.max(1, max * 1.1)] } },
    }, data, el);
  }

  async function renderAnalytics() {
    const params = new URLSearchParams({ range: $("an-range").value });
    if ($("an-model").value) params.set("model", $("an-model").value);
    if ($("an-key").value) params.set("key", $("an-key").value);
    const r = await api(`/admin/api/analytics?${params}`);
    const keyName = (k) => r.key_names[k] || k;
    if (!$("an-model").value) fillSelect($("an-model"), "All models", r.by_model.filter((b) => b.name).map((b) => [b.name, b.name]));
    if (!$("an-key").value) fillSelect($("an-key"), "All keys", r.by_key.map((b) => [b.name, keyName(b.name)]));
    const t = r.totals;
    $("an-totals").replaceChildren(
      stat("Requests", fmtNum(t.requests), `${fmtNum(t.errors)} errors`),
      stat("Prompt tokens", fmtNum(t.prompt_tokens)),
      stat("Generated tokens", fmtNum(t.completion_tokens), `${fmtNum(t.tokens_per_s, 2)} tok/s overall`),
      stat("Decode speed", t.decode_tokens_per_s ? `${fmtNum(t.decode_tokens_per_s, 1)} tok/s` : "—", "per stream"),
      stat("First token", fmtMs(t.ttft_p50_ms), `p95 ${fmtMs(t.ttft_p95_ms)}`),
      stat("Latency", fmtMs(t.latency_p50_ms), `p95 ${fmtMs(t.latency_p95_ms)}`),
    );
    const xs = r.series.map((p) => p.t);
    const col = (f) => r.series.map((p) => (p[f] === undefined ? null : p[f]));
    chart("chart-requests", [["requests/s"], ["errors/s"]],
      [xs, col("requests_per_s"), r.series.map((p) => p.errors / r.step_seconds)]);
    chart("chart-tokens", [["generated/s"], ["prompt/s"]],
      [xs, col("tokens_per_s"), r.series.map((p) => p.prompt_tokens / r.step_seconds)]);
    chart("chart-ttft", [["p50"], ["p95"]], [xs, col("ttft_p50_ms"), col("ttft_p95_ms")]);
    chart("chart-latency", [["p50"], ["p95"]], [xs, col("latency_p50_ms"), col("latency_p95_ms")]);
    const rows = (list, name) => list.map((b) => [name(b.name), fmtNum(b.totals.requests), fmtNum(b.totals.errors),
      fmtNum(b.totals.prompt_tokens), fmtNum(b.totals.completion_tokens), fmtMs(b.totals.ttft_p50_ms),
      fmtMs(b.totals.ttft_p95_ms), fmtMs(b.totals.latency_p95_ms)]);
    const columns = ["", "Requests", "Errors", "Prompt", "Generated", "TTFT p50", "TTFT p95", "Latency p95"];
    $("an-by-model").replaceChildren(table(["Model", ...columns.slice(1)], rows(r.by_model, (n) => n || "(no model)"), "No requests in this range."));
    $("an-by-key").replaceChildren(table(["Key", ...columns.slice(1)], rows(r.by_key, keyName), "No requests in this range."));
  }

  // ---------- Settings ----------

  async function renderSettings() {
    const [keys, cache, server] = await Promise.all([
      api("/admin/api/keys"), api("/internal/cache/stats"), api("/admin/api/settings"),
    ]);
    $("keys").replaceChildren(table(["Name", "Key", "Created", "Requests", "Tokens", "Last used", ""],
      keys.data.map((k) => [k.name, `${k.prefix}…`, fmtTime(k.created_at), fmtNum(k.requests), fmtNum(k.tokens),
        fmtTime(k.last_used_at),
        k.revoked_at ? badge("revoked")
          : h("button", { class: "danger", type: "button", onclick: () => revokeKey(k), text: "Revoke" })]),
      "No named keys yet. Each person or service sharing the server can have its own."));
    $("cache").replaceChildren(
      h("div", { class: "cards" },
        stat("Hits", fmtNum(cache.hits)), stat("Misses", fmtNum(cache.misses)),
        stat("Entries", fmtNum(cache.entries), fmtBytes(cache.bytes)), stat("Evictions", fmtNum(cache.evictions))),
      h("p", {}, h("button", { class: "secondary", type: "button", onclick: flushCache, disabled: !cache.enabled, text: "Flush the cache" }),
        cache.enabled ? "" : h("span", { class: "muted", text: "  the cache is off (ENABLE_CACHE=false)" })));
    const origins = server.cors_allow_origins ? server.cors_allow_origins.join(", ") : "any origin";
    $("server-settings").replaceChildren(table(["Setting", "Value"], [
      ["Listening on", `${server.host}:${server.port}`],
      ["API key required", server.api_key_required ? "yes" : "no (loopback)"],
      ["CORS for /v1", origins], ["CORS for /admin", "same origin only"],
      ["Models directory", server.models_dir], ["Data directory", server.data_dir],
      ["Hub", `${server.hub_endpoint}${server.hub_token_set ? " (with HF_TOKEN)" : ""}`],
      ["Cache", `${server.cache_enabled ? "on" : "off"}, ${server.cache_max_entries} entries or ${Math.round(server.cache_max_bytes / 1048576)} MiB, ${server.cache_ttl_seconds} s${server.cache_persist_to_disk ? ", on disk" : ""}${server.cache_shared ? `, shared via ${server.cache_shared}` : ""}`],
      ["Analytics kept", `${server.analytics_retention_days} days`],
    ], ""));
  }

  async function revokeKey(key) {
    if (!confirm(`Revoke the key "${key.name}"? Clients using it stop working at once.`)) return;
    try {
      await api(`/admin/api/keys/${encodeURIComponent(key.id)}`, { method: "DELETE" });
    } catch (error) {
      alert(error.message);
    }
    refresh(pages.settings);
  }

  async function flushCache() {
    try {
      await api("/admin/api/cache/flush", { method: "POST" });
    } catch (error) {
      alert(error.message);
    }
    refresh(pages.settings);
  }

  $("key-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const box = $("key-created");
    try {
      const created = await api("/admin/api/keys", { method: "POST", body: { name: $("key-name").value.trim() } });
      $("key-name").value = "";
      const value = h("code", { id: "new-key", text: created.key });
      box.replaceChildren(h("strong", { text: `Key "${created.name}" created. ` }),
        "Copy it now: it is shown only once. ", value, " ",
        h("button", { type: "button", class: "secondary", onclick: () => navigator.clipboard && navigator.clipboard.writeText(created.key), text: "Copy" }));
      box.hidden = false;
    } catch (error) {
      box.replaceChildren(h("span", { class: "error", text: error.message }));
      box.hidden = false;
    }
    refresh(pages.settings);
  });

  // ---------- start ----------

  window.addEventListener("resize", () => {
    if (app.page === "analytics") refresh(pages.analytics);
  });

  const key = savedKey();
  if (key) {
    signIn(key, !!localStorage.getItem(KEY_STORE)).catch((error) => signOut(error.message));
  } else {
    signOut();
  }
})();
