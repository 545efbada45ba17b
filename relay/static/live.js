// The live page of relay's operator API. No framework, no build step: every value from
// the server is written with textContent, never as HTML (session fields come from clients).
"use strict";
(function () {
  const KEY = "relay.adminKey";
  const REFRESH_MS = 1000;
  const $ = (id) => document.getElementById(id);
  let timer = null;

  function key() { return sessionStorage.getItem(KEY); }

  function el(tag, text, cls) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    if (cls) node.className = cls;
    return node;
  }

  async function api(method, path) {
    const response = await fetch(path, {
      method: method,
      headers: { "Authorization": "Bearer " + key() },
      cache: "no-store",
      credentials: "omit",
    });
    if (response.status === 401) {
      logout("That admin key was refused.");
      throw new Error("unauthorized");
    }
    return response;
  }

  function age(seconds) {
    seconds = Math.max(0, Math.floor(seconds));
    const h = Math.floor(seconds / 3600), m = Math.floor(seconds / 60) % 60, s = seconds % 60;
    return (h ? h + "h " : "") + (h || m ? m + "m " : "") + s + "s";
  }

  // Prometheus text → {name: total over all label sets, "name{direction=...}": value}.
  function parseMetrics(text) {
    const totals = {};
    for (const line of text.split("\n")) {
      if (!line || line[0] === "#") continue;
      const match = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})?\s+(\S+)/.exec(line);
      if (!match) continue;
      const value = Number(match[3]);
      if (!Number.isFinite(value)) continue;
      totals[match[1]] = (totals[match[1]] || 0) + value;
      const direction = /direction="([a-z_]+)"/.exec(match[2] || "");
      if (direction) totals[match[1] + ":" + direction[1]] = value;
    }
    return totals;
  }

  const COUNTERS = [
    ["relay_sessions_active", "sessions active"],
    ["relay_sessions_started_total", "sessions started"],
    ["relay_sessions_ended_total", "sessions ended"],
    ["relay_messages_relayed_total:client_to_bot", "messages client→bot"],
    ["relay_messages_relayed_total:bot_to_client", "messages bot→client"],
    ["relay_bytes_relayed_total:client_to_bot", "bytes client→bot"],
    ["relay_bytes_relayed_total:bot_to_client", "bytes bot→client"],
    ["relay_token_refusals_total", "token refusals"],
    ["relay_start_requests_total", "/start requests"],
  ];

  function renderCounters(totals) {
    const list = $("counters");
    list.replaceChildren();
    for (const [name, label] of COUNTERS) {
      const item = el("div");
      item.append(el("dt", label), el("dd", Math.round(totals[name] || 0)));
      list.append(item);
    }
  }

  function renderAgents(agents) {
    const body = $("agents").tBodies[0];
    body.replaceChildren();
    for (const agent of agents) {
      const row = el("tr");
      row.dataset.agent = agent.name;
      const state = el("td", agent.draining ? "draining" : "accepted",
                       agent.draining ? "draining" : "");
      const button = el("button", agent.draining ? "End drain" : "Drain", "drain");
      button.type = "button";
      button.setAttribute("aria-pressed", agent.draining ? "true" : "false");
      button.addEventListener("click", () => act(agent.draining ? "DELETE" : "POST",
        "/v1/admin/agents/" + encodeURIComponent(agent.name) + "/drain"));
      const cell = el("td");
      cell.append(button);
      row.append(el("td", agent.name), el("td", agent.sessions, "num"), state, cell);
      body.append(row);
    }
  }

  function renderSessions(sessions) {
    const body = $("sessions").tBodies[0];
    body.replaceChildren();
    $("session-count").textContent = "(" + sessions.length + ")";
    if (!sessions.length) {
      const row = el("tr", null, "empty");
      const cell = el("td", "no live sessions");
      cell.colSpan = 8;
      row.append(cell);
      body.append(row);
      return;
    }
    const now = Date.now() / 1000;
    for (const s of sessions) {
      const row = el("tr");
      row.dataset.sessionId = s.id;
      const button = el("button", "End", "end");
      button.type = "button";
      button.addEventListener("click", () => {
        button.disabled = true;
        act("DELETE", "/v1/admin/sessions/" + encodeURIComponent(s.id));
      });
      const cell = el("td");
      cell.append(button);
      const messages = s.messages || {};
      row.append(el("td", s.id, "id"), el("td", s.agent), el("td", s.client_addr, "client"),
                 el("td", age(now - s.connected_at), "num"), el("td", s.instance),
                 el("td", messages.client_to_bot, "num"),
                 el("td", messages.bot_to_client, "num"), cell);
      body.append(row);
    }
  }

  async function act(method, path) {
    try {
      const response = await api(method, path);
      if (!response.ok && response.status !== 404) {
        $("status").textContent = method + " failed: HTTP " + response.status;
      }
    } catch (err) { return; }
    refresh();
  }

  async function refresh() {
    if (!key()) return;
    try {
      const [sessions, agents, metrics] = await Promise.all([
        api("GET", "/v1/admin/sessions").then((r) => r.json()),
        api("GET", "/v1/admin/agents").then((r) => r.json()),
        fetch("/metrics", { cache: "no-store", credentials: "omit" }).then((r) => r.text()),
      ]);
      renderSessions(sessions.sessions);
      renderAgents(agents.agents);
      renderCounters(parseMetrics(metrics));
      $("status").textContent = "updated " + new Date().toLocaleTimeString();
    } catch (err) {
      if (key()) $("status").textContent = "gateway unreachable, retrying";
    }
  }

  function loop() {
    clearTimeout(timer);
    refresh().finally(() => { if (key()) timer = setTimeout(loop, REFRESH_MS); });
  }

  function show(loggedIn) {
    $("login").hidden = loggedIn;
    $("live").hidden = !loggedIn;
    $("logout").hidden = !loggedIn;
  }

  function logout(message) {
    sessionStorage.removeItem(KEY);
    clearTimeout(timer);
    show(false);
    $("status").textContent = "";
    $("login-error").textContent = message || "";
  }

  $("login").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(KEY, $("key").value);
    $("key").value = "";
    $("login-error").textContent = "";
    show(true);
    loop();
  });
  $("logout").addEventListener("click", () => logout(""));

  if (key()) { show(true); loop(); } else { show(false); }
})();
