// The glassroom console: hash-routed pages over the /v1 API.  Every text that a
// sandbox controls goes in with textContent (el()), never innerHTML.
"use strict";
(function () {
  const main = document.getElementById("main");
  let timer = null;

  function csrf() {
    const m = document.cookie.match(/(?:^|; )glassroom_csrf=([^;]*)/);
    return m ? decodeURIComponent(m[1]) : "";
  }
  function el(tag, attrs, ...kids) {
    const n = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "on") for (const [ev, fn] of Object.entries(v)) n.addEventListener(ev, fn);
      else n.setAttribute(k, v);
    }
    for (const k of kids) n.append(k instanceof Node ? k : document.createTextNode(String(k ?? "")));
    return n;
  }
  async function api(method, path, body) {
    const opts = { method, credentials: "same-origin", headers: {} };
    if (method !== "GET") opts.headers["X-Glassroom-CSRF"] = csrf();
    if (body !== undefined) { opts.headers["Content-Type"] = "application/json"; opts.body = JSON.stringify(body); }
    const r = await fetch(path, opts);
    if (r.status === 401) { location.hash = "#/login"; throw new Error("log in"); }
    const ct = r.headers.get("content-type") || "";
    const data = ct.includes("json") ? await r.json() : await r.text();
    if (!r.ok) throw new Error((data.error && data.error.message) || r.status);
    return data;
  }
  function page(title, ...kids) { main.replaceChildren(el("h1", {}, title), ...kids); }
  function age(iso) { const s = Math.max(0, (Date.now() - Date.parse(iso)) / 1000); return s < 90 ? `${s.toFixed(0)} s` : `${(s / 60).toFixed(0)} min`; }
  function left(iso) { return Math.max(0, (Date.parse(iso) - Date.now()) / 1000).toFixed(0) + " s"; }
  function mib(b) { return b == null ? "–" : (b / 1048576).toFixed(1) + " MiB"; }

  function login() {
    document.getElementById("nav").hidden = true;
    document.getElementById("logout").hidden = true;
    const key = el("input", { id: "key", type: "password", autocomplete: "off", placeholder: "glr_..." });
    const err = el("div", { class: "error", id: "login-error" });
    const form = el("form", { class: "card login", id: "login-form", on: { submit: async (ev) => {
      ev.preventDefault();
      const r = await fetch("/console/login", { method: "POST", credentials: "same-origin",
        headers: { "Content-Type": "application/json" }, body: JSON.stringify({ key: key.value }) });
      if (!r.ok) { err.textContent = "That key was not accepted."; return; }
      const d = await r.json();
      sessionStorage.setItem("tenant", d.tenant);
      location.hash = "#/sandboxes";
    } } }, el("h1", {}, "Log in"), el("label", { for: "key" }, "Tenant API key"), key,
      el("p", {}, el("button", { class: "primary", type: "submit", id: "login-submit" }, "Log in")), err);
    main.replaceChildren(form);
  }

  async function sandboxes() {
    const body = el("tbody", { id: "sandbox-rows" });
    page("Sandboxes", el("table", {}, el("thead", {}, el("tr", {}, ...["id", "tier / backend",
      "template", "state", "age", "deadline", "CPU", "memory", "pids", ""].map((h) => el("th", {}, h)))), body));
    async function refresh() {
      const list = await api("GET", "/v1/sandboxes");
      const rows = [];
      for (const s of list) {
        let u = {};
        try { u = await api("GET", `/v1/sandboxes/${encodeURIComponent(s.sandbox_id)}/usage`); } catch (e) { /* gone */ }
        const id = encodeURIComponent(s.sandbox_id);
        rows.push(el("tr", { "data-id": s.sandbox_id },
          el("td", { class: "mono" }, el("a", { href: `#/sandbox/${id}` }, s.sandbox_id)),
          el("td", {}, `${s.tier} / ${s.backend}`), el("td", {}, s.template || "–"),
          el("td", {}, el("span", { class: "badge" }, s.state)), el("td", {}, age(s.started_at)),
          el("td", {}, left(s.end_at)),
          el("td", {}, u.cpu_usec == null ? "–" : (u.cpu_usec / 1e6).toFixed(2) + " s"),
          el("td", {}, mib(u.memory_bytes)), el("td", {}, u.pids ?? "–"),
          el("td", { class: "row" },
            el("button", { on: { click: async () => { await api("POST", `/v1/sandboxes/${id}/timeout`, { timeout_s: Math.max(60, s.timeout_s + 300) }); refresh(); } } }, "+5 min"),
            el("button", { class: "danger", on: { click: async () => { await api("DELETE", `/v1/sandboxes/${id}`); refresh(); } } }, "Kill"))));
      }
      if (!rows.length) rows.push(el("tr", {}, el("td", { colspan: "10", class: "muted" }, "No live sandboxes.")));
      body.replaceChildren(...rows);
    }
    await refresh();
    timer = setInterval(() => refresh().catch(() => {}), 2000);
  }

  async function sandbox(id) {
    const sid = encodeURIComponent(id);
    const [info, pol, recs] = await Promise.all([api("GET", `/v1/sandboxes/${sid}`),
      api("GET", `/v1/sandboxes/${sid}/policy`), api("GET", `/v1/sandboxes/${sid}/audit`)]);
    const cmds = el("tbody", { id: "commands" });
    for (const r of recs) {
      if (r.event === "command.started") cmds.append(el("tr", {}, el("td", {}, r.ts), el("td", { class: "mono" }, JSON.stringify(r.details.argv)), el("td", {}, "")));
      if (r.event === "command.ended" && cmds.lastChild) cmds.lastChild.lastChild.textContent = `exit ${r.details.exit_code}`;
    }
    const files = el("ul", { id: "files" });
    try { for (const f of await api("GET", `/v1/sandboxes/${sid}/dir?path=/workspace`)) files.append(el("li", { class: "mono" }, f.name)); } catch (e) { files.append(el("li", { class: "muted" }, String(e.message))); }
    const cmd = el("input", { id: "cmd", placeholder: "a shell command" });
    const out = el("pre", { id: "cmd-output" });
    const run = el("form", { class: "row", on: { submit: async (ev) => {
      ev.preventDefault();
      const r = await api("POST", `/v1/sandboxes/${sid}/commands`, { command: cmd.value });
      out.textContent = r.stdout + r.stderr + `\n[exit ${r.exit_code}]`;
    } } }, cmd, el("button", { class: "primary", type: "submit" }, "Run"));
    page(`Sandbox ${info.sandbox_id}`,
      el("p", {}, el("a", { href: `#/audit/${sid}`, id: "open-timeline" }, "Audit timeline →"), "  ",
        el("span", { class: "muted" }, `${info.tier} / ${info.backend} · ${info.state} · deadline in ${left(info.end_at)}`)),
      el("div", { class: "grid" },
        el("div", { class: "card" }, el("h2", {}, "Policy as written"), el("pre", { id: "policy" }, pol.written)),
        el("div", { class: "card" }, el("h2", {}, "Compiled to walls"), el("pre", { id: "walls" }, JSON.stringify(pol.walls, null, 2)))),
      el("div", { class: "card" }, el("h2", {}, "Commands and exits"), el("table", {}, cmds)),
      el("div", { class: "grid" },
        el("div", { class: "card" }, el("h2", {}, "/workspace"), files),
        el("div", { class: "card" }, el("h2", {}, "Run a command"), run, out)));
  }

  const KINDS = { file: (r) => r.event.startsWith("file"), exec: (r) => r.event.startsWith("command") || r.event.startsWith("exec"),
    net: (r) => r.event.startsWith("network"), credential: (r) => r.event.startsWith("credential"), blocked: (r) => r.decision === "deny" };

  async function audit(id) {
    const sid = encodeURIComponent(id);
    const [recs, ver] = await Promise.all([api("GET", `/v1/sandboxes/${sid}/audit`), api("GET", "/v1/audit/verify")]);
    const checks = {};
    const filters = el("div", { class: "filters" });
    for (const k of Object.keys(KINDS)) { checks[k] = el("input", { type: "checkbox", id: `f-${k}` }); filters.append(el("label", {}, checks[k], " " + k)); }
    const axis = el("div", { class: "axis" });
    const rows = el("tbody", { id: "audit-rows" });
    const t0 = recs.length ? Date.parse(recs[0].ts) : 0;
    const span = recs.length ? Math.max(1, Date.parse(recs[recs.length - 1].ts) - t0) : 1;
    function draw() {
      const on = Object.keys(KINDS).filter((k) => checks[k].checked);
      const shown = recs.filter((r) => !on.length || on.some((k) => KINDS[k](r)));
      axis.replaceChildren(...shown.map((r) => el("div", { class: "tick" + (r.decision === "deny" ? " deny" : ""),
        style: `left:calc(${((Date.parse(r.ts) - t0) / span) * 100}% - 2px)`, title: r.event })));
      rows.replaceChildren(...shown.map((r) => el("tr", { class: r.decision === "deny" ? "deny" : "" },
        el("td", { class: "mono" }, r.seq), el("td", { class: "mono" }, r.ts), el("td", {}, r.event),
        el("td", {}, el("span", { class: "badge" + (r.decision === "deny" ? " deny" : "") }, r.decision)),
        el("td", { class: "rule" }, r.rule || ""), el("td", { class: "mono" }, JSON.stringify(r.details)))));
    }
    Object.values(checks).forEach((c) => c.addEventListener("change", draw));
    const exp = el("button", { id: "export", on: { click: () => {
      const blob = new Blob([recs.map((r) => JSON.stringify(r)).join("\n") + "\n"], { type: "application/x-ndjson" });
      const a = el("a", { href: URL.createObjectURL(blob), download: `${id}.audit.jsonl` }); a.click();
    } } }, "Export JSONL");
    page(`Audit timeline · ${id}`,
      el("div", { class: "card row" }, el("span", { id: "verify", class: "badge " + (ver.ok ? "ok" : "deny") },
        ver.ok ? `audit verify: ok (${ver.records} records)` : "audit verify: FAILED"), el("span", { class: "muted" }, ver.anchor || ""), exp),
      filters, axis, el("table", {}, el("thead", {}, el("tr", {}, ...["seq", "time", "event", "decision", "rule", "details"].map((h) => el("th", {}, h)))), rows));
    draw();
  }

  async function approvals() {
    const body = el("tbody", { id: "approval-rows" });
    page("Approvals", el("p", { class: "muted" }, "network.ask holds of your sandboxes; unanswered ones are denied at their timeout."),
      el("table", {}, el("thead", {}, el("tr", {}, ...["sandbox", "action", "target", "rule", "requested", "timeout", ""].map((h) => el("th", {}, h)))), body));
    async function refresh() {
      const list = (await api("GET", "/v1/approvals")).filter((a) => a.state === "pending");
      const decide = (a, d) => async () => { await api("POST", `/v1/approvals/${encodeURIComponent(a.approval_id)}`, { decision: d }); refresh(); };
      body.replaceChildren(...list.map((a) => el("tr", { "data-id": a.approval_id },
        el("td", { class: "mono" }, a.sandbox_id), el("td", {}, a.action), el("td", { class: "mono" }, a.target),
        el("td", { class: "rule" }, a.rule), el("td", {}, age(a.requested_at) + " ago"),
        el("td", { class: "countdown" }, a.expires_at ? left(a.expires_at) : "–"),
        el("td", { class: "row" }, el("button", { class: "primary approve", on: { click: decide(a, "approve") } }, "Approve"),
          el("button", { class: "danger deny", on: { click: decide(a, "deny") } }, "Deny")))));
      if (!list.length) body.replaceChildren(el("tr", {}, el("td", { colspan: "7", class: "muted" }, "Nothing is waiting.")));
    }
    await refresh();
    timer = setInterval(() => refresh().catch(() => {}), 1000);
  }

  async function route() {
    if (timer) { clearInterval(timer); timer = null; }
    const [, name, arg] = (location.hash || "#/sandboxes").split("/");
    if (name === "login" || !csrf()) return login();
    document.getElementById("nav").hidden = false;
    document.getElementById("logout").hidden = false;
    document.getElementById("who").textContent = sessionStorage.getItem("tenant") || "";
    for (const a of document.querySelectorAll("nav a")) a.classList.toggle("active", a.id === `nav-${name}`);
    const pages = { sandboxes, sandbox, audit, approvals };
    try { await (pages[name] || sandboxes)(arg && decodeURIComponent(arg)); }
    catch (e) { main.replaceChildren(el("div", { class: "error" }, String(e.message))); }
  }
  document.getElementById("logout").addEventListener("click", async () => {
    await fetch("/console/logout", { method: "POST", credentials: "same-origin" });
    location.hash = "#/login";
  });
  window.addEventListener("hashchange", route);
  route();
})();
