// trio_bg's dashboard: keeps the server-rendered page live. Every second it fetches
// state.json (the look the page was rendered from, again), and puts each change in
// place: rows are kept by key and cells redrawn only when theirs changed, so a focused
// button stays focused. Actions are the page's own forms, sent without a reload.
"use strict";
(() => {
  const POLL = 1000;
  const SERIES = ["completed", "failed", "cancelled"];
  const SVG = "http://www.w3.org/2000/svg";
  const body = document.body;
  const root = body.dataset.root;
  const token = body.dataset.token;
  const live = document.getElementById("live");
  const notice = document.getElementById("notice");
  const first = JSON.parse(document.getElementById("look").textContent);
  let etag = first.etag;
  let skew = first.state.now - Date.now() / 1000; // the server's clock minus ours
  let timer = 0;

  // A duration for people, as the server writes it (dashboard_data.seconds).
  function seconds(s) {
    if (s === 0) return "0 s";
    if (s < 1) return `${Math.round(s * 1000)} ms`;
    if (s < 10) return `${s.toFixed(1)} s`;
    if (s < 60) return `${Math.round(s)} s`;
    if (s < 3600) return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
    return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
  }

  function el(tag, attributes = {}, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, value);
    node.append(...children);
    return node;
  }

  function action([verb, id, label]) {
    const form = el("form", { method: "post", action: `${root}/${verb}`, class: "act" },
      el("input", { type: "hidden", name: "token", value: token }),
      el("input", { type: "hidden", name: "id", value: id }),
      el("button", { class: verb, "aria-label": label }, verb[0].toUpperCase() + verb.slice(1)));
    if (verb === "purge") form.dataset.confirm = `${label}?`;
    return form;
  }

  // One cell's content, from its spec (see dashboard_data.Cell).
  function draw(td, spec) {
    td.removeAttribute("data-since");
    td.className = "";
    if (spec === null || typeof spec !== "object") return td.replaceChildren(spec ?? "");
    if ("since" in spec) {
      if (spec.since !== null) td.dataset.since = spec.since;
      return td.replaceChildren();
    }
    if ("badge" in spec) {
      const state = spec.badge;
      return td.replaceChildren(el("span", { class: `badge b-${state}` }, state.replace("_", " ")));
    }
    if ("id" in spec) return td.replaceChildren(el("code", { title: spec.id }, spec.id.slice(0, 8)));
    if ("text" in spec) {
      td.className = "text";
      return td.replaceChildren(spec.text);
    }
    if ("code" in spec) return td.replaceChildren(el("code", {}, spec.code));
    if ("progress" in spec) {
      const bar = el("progress", { max: "1", value: spec.progress, "aria-hidden": "true" });
      return td.replaceChildren(bar, ` ${Math.round(spec.progress * 100)} %`);
    }
    td.className = "do";
    td.replaceChildren(...spec.do.map(action));
  }

  // Put a table's rows in place; ``adopt``: they are there already (the server's).
  function fill(tbody, rows, adopt) {
    const old = new Map();
    for (const tr of [...tbody.rows]) {
      if (old.has(tr.dataset.key)) tr.remove(); // (never two rows of one task)
      else old.set(tr.dataset.key, tr);
    }
    if (!rows.length) {
      const columns = tbody.closest("table").tHead.rows[0].cells.length;
      if (!tbody.querySelector(".empty")) {
        tbody.replaceChildren(el("tr", { class: "empty" },
          el("td", { colspan: columns }, tbody.dataset.empty)));
      }
      return;
    }
    // Each cell carries its column's name: a phone shows its rows as cards.
    const labels = [...tbody.closest("table").tHead.rows[0].cells].map((th) => th.textContent);
    rows.forEach((row, i) => {
      let tr = old.get(row.key);
      old.delete(row.key);
      if (!tr) tr = el("tr", { "data-key": row.key });
      row.cells.forEach((spec, j) => {
        const sig = JSON.stringify(spec);
        const td = tr.cells[j] ?? tr.appendChild(
          j ? el("td", { "data-label": labels[j] }) : el("th", { scope: "row" }));
        if (td.dataset.sig !== sig) {
          if (!adopt) draw(td, spec);
          td.dataset.sig = sig;
        }
      });
      if (tbody.rows[i] !== tr) tbody.insertBefore(tr, tbody.rows[i] ?? null);
    });
    for (const tr of old.values()) tr.remove();
  }

  function chart(svg, { bars, max }) {
    const height = svg.viewBox.baseVal.height;
    const rects = [];
    for (const [slot, ...values] of bars) {
      let y = height;
      values.forEach((value, k) => {
        if (!value) return;
        const h = (value / Math.max(max, 1)) * (height - 2);
        y -= h;
        const rect = document.createElementNS(SVG, "rect");
        const place = { class: `s-${SERIES[k]}`, x: slot + 0.1, y, width: 0.8, height: h };
        for (const [name, value] of Object.entries(place)) rect.setAttribute(name, value);
        rects.push(rect);
      });
    }
    svg.firstElementChild.replaceChildren(...rects);
    document.querySelector("[data-chart-max]").textContent = max;
  }

  function text(selector, values) {
    for (const node of document.querySelectorAll(`[${selector}]`)) {
      const value = values[node.getAttribute(selector)];
      if (value !== undefined && node.textContent !== String(value)) node.textContent = value;
    }
  }

  function show(state, adopt = false) {
    text("data-count", state.counts);
    text("data-rate", state.rates);
    text("data-system", state.system);
    const notes = {};
    for (const [key, table] of Object.entries(state.tables)) {
      fill(document.querySelector(`tbody[data-table="${key}"]`), table.rows, adopt);
      notes[key] = table.note;
    }
    text("data-note", notes);
    if (!adopt) chart(document.querySelector("svg.chart"), state.chart);
    live.textContent = state.draining ? "Draining: new tasks are refused" : "Serving";
    live.classList.remove("offline");
  }

  function ages() {
    const now = Date.now() / 1000 + skew;
    for (const td of document.querySelectorAll("td[data-since]")) {
      const age = seconds(Math.max(0, now - Number(td.dataset.since)));
      if (td.textContent !== age) td.textContent = age;
    }
  }

  async function poll() {
    clearTimeout(timer);
    if (document.hidden) return; // a hidden page costs nothing: it looks again when shown
    try {
      const response = await fetch(`${root}/state.json${location.search}`, {
        headers: { "if-none-match": etag }, credentials: "same-origin",
      });
      if (response.status === 200) {
        const state = await response.json();
        etag = response.headers.get("etag");
        skew = state.now - Date.now() / 1000;
        show(state);
      } else if (response.status !== 304) {
        throw new Error(`the server answered ${response.status}`);
      }
    } catch (error) {
      live.textContent = `Not live: ${error.message}; trying again`;
      live.classList.add("offline");
    }
    ages();
    timer = setTimeout(poll, POLL);
  }

  function say(message) {
    notice.textContent = message;
    setTimeout(() => { if (notice.textContent === message) notice.textContent = ""; }, 4000);
  }

  document.addEventListener("submit", async (event) => {
    const form = event.target;
    if (form.classList.contains("filter")) {
      event.preventDefault();
      const query = new URLSearchParams([...new FormData(form)].filter(([, v]) => v !== ""));
      history.replaceState(null, "", `${location.pathname}${query.size ? `?${query}` : ""}`);
      etag = "";
      return poll();
    }
    if (!form.classList.contains("act")) return;
    event.preventDefault();
    if (form.dataset.confirm && !confirm(form.dataset.confirm)) return;
    const label = form.querySelector("button").getAttribute("aria-label");
    try {
      const response = await fetch(form.action, {
        method: "POST", body: new URLSearchParams(new FormData(form)),
        headers: { accept: "application/json" }, credentials: "same-origin",
      });
      if (!response.ok) throw new Error(await response.text());
      const { done } = await response.json();
      say(done ? `${label}: done.` : `${label}: nothing to do (it has ended or gone).`);
    } catch (error) {
      say(`${label}: failed. ${error.message}`);
    }
    poll();
  });
  document.querySelector("form.filter")?.addEventListener("change", (event) => {
    event.currentTarget.requestSubmit();
  });
  document.addEventListener("visibilitychange", () => { if (!document.hidden) poll(); });

  show(first.state, true);
  ages();
  timer = setTimeout(poll, POLL);
})();
