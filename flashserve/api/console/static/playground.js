// The playground: a chat that streams from /console/api/chat/completions with the session cookie and the
// page's CSRF token (the browser never holds an API key). Model output is rendered as Markdown by marked
// and sanitized by DOMPurify before it touches the DOM, so a reply cannot run script.
(function () {
  "use strict";
  const $ = function (id) { return document.getElementById(id); };
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  const config = JSON.parse($("pg-config").textContent);
  let history = [];          // the conversation as chat messages (assistant turns as sent back)
  let controller = null;     // aborts the turn in flight (Stop)

  function renderMarkdown(node, text) {
    const html = window.marked.parse(text, { async: false, gfm: true, breaks: true });
    node.innerHTML = window.DOMPurify.sanitize(html, { USE_PROFILES: { html: true }, FORBID_TAGS: ["style", "form", "input"] });
    node.querySelectorAll("a").forEach(function (a) { a.rel = "noopener noreferrer nofollow"; a.target = "_blank"; });
  }

  function showError(message) {
    const box = $("pg-error");
    box.textContent = message;
    box.classList.toggle("hidden", !message);
  }

  function settingsError(message) {
    const box = $("pg-settings-error");
    box.textContent = message;
    box.classList.toggle("hidden", !message);
  }

  $("pg-format").addEventListener("change", function () {
    $("pg-schema-label").classList.toggle("hidden", $("pg-format").value !== "json_schema");
  });

  // The request for the current settings and conversation, plus `userText` as a new turn when given.
  function buildBody(userText) {
    const body = { model: $("pg-model").value, messages: [], stream: true, stream_options: { include_usage: true } };
    const system = $("pg-system").value.trim();
    if (system) body.messages.push({ role: "system", content: system });
    body.messages = body.messages.concat(history);
    if (userText) body.messages.push({ role: "user", content: userText });
    const temperature = $("pg-temperature").value;
    if (temperature !== "") body.temperature = Number(temperature);
    const maxTokens = $("pg-max-tokens").value;
    if (maxTokens !== "") body.max_tokens = parseInt(maxTokens, 10);
    if ($("pg-effort").value) body.reasoning_effort = $("pg-effort").value;
    const format = $("pg-format").value;
    if (format === "json_object") body.response_format = { type: "json_object" };
    if (format === "json_schema") {
      body.response_format = { type: "json_schema", json_schema: { name: "answer", schema: JSON.parse($("pg-schema").value), strict: true } };
    }
    const tools = $("pg-tools").value.trim();
    if (tools) {
      const parsed = JSON.parse(tools);
      if (!Array.isArray(parsed)) throw new Error("Tools must be a JSON array of {type: 'function', function: {...}}.");
      body.tools = parsed;
    }
    return body;
  }

  function addTurn(role, text) {
    const turn = document.createElement("div");
    turn.className = "turn " + role;
    const label = document.createElement("div");
    label.className = "role";
    label.textContent = role;
    const bubble = document.createElement("div");
    bubble.className = role === "user" ? "bubble" : "markdown";
    if (role === "user") bubble.textContent = text; else renderMarkdown(bubble, text);
    turn.append(label, bubble);
    $("pg-transcript").append(turn);
  }

  function resetTurnView() {
    $("pg-output").textContent = "";
    $("pg-reasoning").textContent = "";
    $("pg-reasoning-box").classList.add("hidden");
    $("pg-tool-calls").textContent = "";
    $("pg-tokens").textContent = "";
    $("pg-timing").textContent = "";
    $("pg-cost").textContent = "…";
    showError("");
  }

  function archiveTurnView() {
    // The finished turn moves into the transcript; the live view is for the next one.
    const text = $("pg-output").dataset.raw || "";
    if (text) addTurn("assistant", text);
    $("pg-output").dataset.raw = "";
    $("pg-turn").classList.add("hidden");
  }

  async function send(userText) {
    let body;
    try { body = buildBody(userText); settingsError(""); } catch (e) { settingsError(String(e.message || e)); return; }
    if (userText) {  // the turn joins the conversation only once its request could be built
      archiveTurnView();
      history.push({ role: "user", content: userText });
      addTurn("user", userText);
      $("pg-input").value = "";
    }
    resetTurnView();
    $("pg-turn").classList.remove("hidden");
    $("pg-send").disabled = true; $("pg-regenerate").disabled = true; $("pg-stop").disabled = false;
    controller = new AbortController();
    const started = performance.now();
    let firstToken = null, content = "", reasoning = "", usage = null, requestId = null;
    const calls = [];
    try {
      const response = await fetch("/console/api/chat/completions", {
        method: "POST", credentials: "same-origin", signal: controller.signal,
        headers: { "content-type": "application/json", "x-csrf-token": csrf }, body: JSON.stringify(body),
      });
      if (!response.ok) {
        let message = response.status + " " + response.statusText;
        try { message = (await response.json()).error.message; } catch (_) { /* not JSON */ }
        throw new Error(message);
      }
      requestId = response.headers.get("x-request-id");
      const reader = response.body.getReader();
      const decoder = new TextDecoder();
      let buffer = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += decoder.decode(value, { stream: true });
        let cut;
        while ((cut = buffer.indexOf("\n\n")) >= 0) {
          const event = buffer.slice(0, cut);
          buffer = buffer.slice(cut + 2);
          for (const line of event.split("\n")) {
            if (!line.startsWith("data: ")) continue;
            const data = line.slice(6);
            if (data === "[DONE]") continue;
            const chunk = JSON.parse(data);
            if (chunk.error) throw new Error(chunk.error.message);
            if (chunk.usage) usage = chunk.usage;
            for (const choice of chunk.choices || []) {
              const delta = choice.delta || {};
              if ((delta.content || delta.reasoning_content) && firstToken === null) firstToken = performance.now();
              if (delta.reasoning_content) {
                reasoning += delta.reasoning_content;
                $("pg-reasoning").textContent = reasoning;
                $("pg-reasoning-box").classList.remove("hidden");
              }
              if (delta.content) {
                content += delta.content;
                $("pg-output").dataset.raw = content;
                renderMarkdown($("pg-output"), content);
              }
              for (const call of delta.tool_calls || []) {
                if (call.id) calls[call.index] = { id: call.id, type: "function", function: { name: call.function.name, arguments: "" } };
                if (call.function && call.function.arguments) calls[call.index].function.arguments += call.function.arguments;
              }
            }
          }
        }
      }
    } catch (e) {
      if (e.name !== "AbortError") showError(String(e.message || e));
      else showError("Stopped.");
    } finally {
      controller = null;
      $("pg-send").disabled = false; $("pg-stop").disabled = true; $("pg-regenerate").disabled = history.length === 0;
    }
    const ended = performance.now();
    showToolCalls(calls);
    const assistant = { role: "assistant", content: content || (calls.length ? null : "") };
    if (calls.length) assistant.tool_calls = calls.filter(Boolean);
    if (content || calls.length) history.push(assistant);
    $("pg-output").dataset.raw = content;
    if (usage) showUsage(usage, started, firstToken, ended);
    if (requestId) await showCost(requestId);
  }

  function showToolCalls(calls) {
    const box = $("pg-tool-calls");
    box.textContent = "";
    calls.filter(Boolean).forEach(function (call) {
      const pre = document.createElement("pre");
      pre.className = "tool-call";
      let args = call.function.arguments;
      try { args = JSON.stringify(JSON.parse(args), null, 2); } catch (_) { /* as sent */ }
      pre.textContent = "tool call " + call.function.name + " (" + call.id + ")\n" + args;
      box.append(pre);
    });
  }

  function showUsage(usage, started, firstToken, ended) {
    const cached = (usage.prompt_tokens_details || {}).cached_tokens || 0;
    const reasoningTokens = (usage.completion_tokens_details || {}).reasoning_tokens || 0;
    $("pg-tokens").textContent = "prompt " + usage.prompt_tokens + " (cached " + cached + ") · completion " +
      usage.completion_tokens + " (reasoning " + reasoningTokens + ") ·";
    const ttft = firstToken === null ? null : (firstToken - started) / 1000;
    const genSeconds = firstToken === null ? 0 : (ended - firstToken) / 1000;
    const rate = genSeconds > 0 && usage.completion_tokens > 1 ? (usage.completion_tokens - 1) / genSeconds : null;
    $("pg-timing").dataset.ttft = ttft === null ? "" : ttft.toFixed(3);
    $("pg-timing").textContent = "TTFT " + (ttft === null ? "–" : ttft.toFixed(2) + " s") + " · " +
      (rate === null ? "–" : rate.toFixed(1)) + " tok/s ·";
  }

  async function showCost(requestId) {
    // The exact cost is the ledger's: read back the usage row of this request (an exact decimal string).
    const response = await fetch("/console/api/requests/" + encodeURIComponent(requestId), { credentials: "same-origin" });
    if (!response.ok) { $("pg-cost").textContent = "–"; return; }
    const row = await response.json();
    $("pg-cost").textContent = "$" + row.cost_usd;
    $("pg-cost").dataset.requestId = row.request_id;  // the object id (chatcmpl-...), as the usage table names it
  }

  $("pg-form").addEventListener("submit", function (event) {
    event.preventDefault();
    const text = $("pg-input").value.trim();
    if (!text || controller) return;
    send(text);
  });
  $("pg-input").addEventListener("keydown", function (event) {
    if (event.key === "Enter" && !event.shiftKey) { event.preventDefault(); $("pg-form").requestSubmit(); }
  });
  $("pg-stop").addEventListener("click", function () { if (controller) controller.abort(); });
  $("pg-regenerate").addEventListener("click", function () {
    if (controller) return;
    if (history.length && history[history.length - 1].role === "assistant") history.pop();
    if (!history.length) return;
    send(null);
  });
  $("pg-clear").addEventListener("click", function () {
    if (controller) controller.abort();
    history = [];
    $("pg-transcript").textContent = "";
    resetTurnView();
    $("pg-cost").textContent = "–";
    $("pg-output").dataset.raw = "";
    $("pg-turn").classList.add("hidden");
  });

  $("pg-view-code").addEventListener("click", function () {
    let body;
    try { body = buildBody($("pg-input").value.trim() || null); } catch (e) { settingsError(String(e.message || e)); return; }
    if (!body.messages.length) body.messages = [{ role: "user", content: "Hello!" }];
    const plain = Object.assign({}, body);
    const json = JSON.stringify(plain, null, 2);
    $("code-curl-text").textContent = "curl " + config.base_url + "/v1/chat/completions -N \\\n" +
      "  -H \"Authorization: Bearer $FLASHSERVE_API_KEY\" \\\n  -H \"Content-Type: application/json\" \\\n" +
      "  -d '" + json.replace(/'/g, "'\\''") + "'";
    const args = Object.keys(plain).map(function (k) { return "    " + k + "=" + pyLiteral(plain[k]) + ","; }).join("\n");
    $("code-python-text").textContent = "import os\nfrom openai import OpenAI\n\nclient = OpenAI(base_url=\"" +
      config.base_url + "/v1\", api_key=os.environ[\"FLASHSERVE_API_KEY\"])\nstream = client.chat.completions.create(\n" +
      args + "\n)\nfor chunk in stream:\n    if chunk.choices and chunk.choices[0].delta.content:\n" +
      "        print(chunk.choices[0].delta.content, end=\"\", flush=True)\n";
    $("pg-code-dialog").showModal();
  });

  function pyLiteral(value) {
    return JSON.stringify(value, null, 4).replace(/\btrue\b/g, "True").replace(/\bfalse\b/g, "False").replace(/\bnull\b/g, "None")
      .split("\n").join("\n    ");
  }

  resetTurnView();
  $("pg-cost").textContent = "–";
})();
