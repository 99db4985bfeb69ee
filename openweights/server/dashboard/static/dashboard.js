// openweights dashboard: live logs (SSE), live metric plots (uPlot + SSE), small helpers.
(function () {
  "use strict";
  const $ = (sel, root) => (root || document).querySelector(sel);
  const csrf = () => { const m = $('meta[name="csrf-token"]'); return m ? m.content : ""; };

  // htmx requests carry the CSRF token like forms do
  document.addEventListener("htmx:configRequest", (e) => { e.detail.headers["X-CSRF-Token"] = csrf(); });

  // copy buttons: data-copy="#selector"
  document.addEventListener("click", (e) => {
    const btn = e.target.closest("[data-copy]");
    if (!btn) return;
    const text = $(btn.dataset.copy).textContent;
    const done = () => { btn.textContent = "Copied"; setTimeout(() => (btn.textContent = "Copy"), 1500); };
    if (navigator.clipboard && window.isSecureContext) {
      navigator.clipboard.writeText(text).then(done, () => fallbackCopy(text, done));
    } else fallbackCopy(text, done);
  });
  function fallbackCopy(text, done) {
    const ta = document.createElement("textarea");
    ta.value = text; ta.style.position = "fixed"; ta.style.opacity = "0";
    document.body.appendChild(ta); ta.select();
    try { document.execCommand("copy"); done(); } finally { ta.remove(); }
  }

  // ---------------------------------------------------------------- live log
  function initLog(pre) {
    const follow = $("#log-follow"), search = $("#log-search"), state = $("#log-state"), matches = $("#log-matches");
    let text = "";
    let pending = ""; // the unterminated last line while searching
    const render = () => {
      const needle = search.value;
      if (!needle) { pre.textContent = text; matches.textContent = ""; }
      else {
        const lines = text.split("\n").filter((l) => l.includes(needle));
        pre.textContent = lines.join("\n");
        matches.textContent = lines.length + " matching line(s)";
      }
      if (follow.checked) pre.scrollTop = pre.scrollHeight;
    };
    search.addEventListener("input", render);
    follow.addEventListener("change", () => { if (follow.checked) pre.scrollTop = pre.scrollHeight; });
    pre.addEventListener("scroll", () => {  // scrolling up stops following, as in a terminal
      const atBottom = pre.scrollHeight - pre.scrollTop - pre.clientHeight < 8;
      if (!atBottom && follow.checked && pre.dataset.auto !== "1") follow.checked = false;
    });
    const es = new EventSource(pre.dataset.stream);
    es.addEventListener("open", () => { state.textContent = "live"; });
    es.addEventListener("chunk", (e) => {
      const d = JSON.parse(e.data);
      text += d.text;
      if (!search.value) {
        pre.appendChild(document.createTextNode(d.text));
        if (follow.checked) { pre.dataset.auto = "1"; pre.scrollTop = pre.scrollHeight; pre.dataset.auto = "0"; }
      } else render();
      pre.dataset.bytes = String(text.length);
    });
    es.addEventListener("end", (e) => {
      const d = JSON.parse(e.data);
      state.textContent = "run " + d.status + " · log complete";
      pre.dataset.ended = d.status;
      es.close();
    });
    es.addEventListener("error", () => { if (!pre.dataset.ended) state.textContent = "reconnecting…"; });
  }

  // ---------------------------------------------------------------- plots
  const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#be185d", "#4d7c0f", "#7c3aed", "#b45309"];

  function ema(ys, alpha) {  // debiased exponential moving average (as TensorBoard)
    if (!alpha) return ys;
    const out = new Array(ys.length);
    let last = 0, n = 0;
    for (let i = 0; i < ys.length; i++) {
      const y = ys[i];
      if (y == null) { out[i] = null; continue; }
      last = last * alpha + (1 - alpha) * y; n++;
      out[i] = last / (1 - Math.pow(alpha, n));
    }
    return out;
  }

  class Plots {
    constructor(root) {
      this.root = root;
      this.raw = {};    // metric -> series -> [xs, ys]
      this.charts = {}; // metric -> {u, box}
      this.smooth = 0;
      this.log = false;
      const s = $("#smoothing"), out = $("#smoothing-value"), lg = $("#logscale");
      if (s) s.addEventListener("input", () => { this.smooth = +s.value; out.value = s.value; this.redrawAll(); });
      if (lg) lg.addEventListener("change", () => { this.log = lg.checked; this.rebuildAll(); });
      window.addEventListener("resize", () => { for (const m in this.charts) this.charts[m].u.setSize(this.size(this.charts[m].box)); });
    }
    size(box) { return { width: Math.max(240, (box ? box.clientWidth : this.root.clientWidth) - 18), height: 220 }; }
    add(metric, key, x, y) {
      const m = (this.raw[metric] = this.raw[metric] || {});
      const s = (m[key] = m[key] || [[], []]);
      s[0].push(x); s[1].push(y);
    }
    aligned(metric) {
      const series = this.raw[metric];
      const keys = Object.keys(series).sort();
      const xset = new Set();
      for (const k of keys) for (const x of series[k][0]) xset.add(x);
      const xs = Array.from(xset).sort((a, b) => a - b);
      const index = new Map(xs.map((x, i) => [x, i]));
      const data = [xs];
      for (const k of keys) {
        const ys = new Array(xs.length).fill(null);
        const [sx, sy] = series[k];
        for (let i = 0; i < sx.length; i++) ys[index.get(sx[i])] = sy[i];
        data.push(ema(ys, this.smooth));
      }
      return { keys, data };
    }
    canLog(metric) {
      for (const k in this.raw[metric]) for (const y of this.raw[metric][k][1]) if (y <= 0) return false;
      return true;
    }
    points(metric) {
      let n = 0;
      for (const k in this.raw[metric]) n += this.raw[metric][k][0].length;
      return n;
    }
    draw(metric) {
      const { keys, data } = this.aligned(metric);
      let c = this.charts[metric];
      const logOk = this.log && this.canLog(metric);
      if (c && (c.keys.join("\u0000") !== keys.join("\u0000") || c.log !== logOk)) { c.u.destroy(); c.box.querySelector(".chart").innerHTML = ""; c = null; }
      if (!c) {
        let box = this.charts[metric] && this.charts[metric].box;
        if (!box) {
          box = document.createElement("figure");
          box.className = "plot"; box.dataset.metric = metric;
          const cap = document.createElement("figcaption"); cap.textContent = metric;
          const chart = document.createElement("div"); chart.className = "chart";
          chart.setAttribute("role", "img"); chart.setAttribute("aria-label", metric + " against step");
          box.appendChild(cap); box.appendChild(chart);
          this.insertSorted(box, metric);
        }
        const opts = {
          ...this.size(box),
          scales: { x: { time: false }, y: logOk ? { distr: 3 } : {} },
          axes: [{ label: "step" }, {}],
          series: [{ label: "step" }].concat(keys.map((k, i) => ({ label: k, stroke: COLORS[i % COLORS.length], width: 1.5, spanGaps: true, points: { show: data[0].length < 40 } }))),
          legend: { live: true },
        };
        const u = new uPlot(opts, data, box.querySelector(".chart"));
        c = this.charts[metric] = { u, box, keys, log: logOk };
        if (this.log && !logOk) box.querySelector("figcaption").textContent = metric + " (linear: has values ≤ 0)";
        else box.querySelector("figcaption").textContent = metric;
      } else c.u.setData(data);
      c.box.dataset.points = String(this.points(metric));
      c.box.dataset.series = JSON.stringify(keys);
    }
    insertSorted(box, metric) {
      // the curves researchers look at first, then the rest by name
      const FIRST = ["loss", "eval_loss", "logp_mean", "logp", "reward", "rewards", "learning_rate", "grad_norm"];
      const rank = (m) => { const i = FIRST.indexOf(m); return (i < 0 ? FIRST.length : i).toString().padStart(3, "0") + m; };
      const after = Array.from(this.root.children).find((el) => rank(el.dataset.metric) > rank(metric));
      this.root.insertBefore(box, after || null);
    }
    redrawAll() { for (const m in this.raw) this.draw(m); }
    rebuildAll() { for (const m in this.charts) { this.charts[m].u.destroy(); this.charts[m].box.querySelector(".chart").innerHTML = ""; this.charts[m].keys = []; } this.redrawAll(); }
    load(metrics, prefix) {
      for (const metric in metrics)
        for (const key in metrics[metric]) {
          const [xs, ys] = metrics[metric][key];
          for (let i = 0; i < xs.length; i++) this.add(metric, prefix ? prefix + " " + key : key, xs[i], ys[i]);
        }
    }
  }

  async function initPlots(root) {
    const state = $("#plot-state");
    const plots = new Plots(root);
    if (root.dataset.compare) {
      const ids = JSON.parse(root.dataset.compare);
      for (const id of ids) {
        const r = await fetch(root.dataset.prefix + "/jobs/" + encodeURIComponent(id) + "/metrics.json");
        if (r.ok) plots.load((await r.json()).metrics, id);
      }
      plots.redrawAll();
      state.textContent = Object.keys(plots.raw).length ? "" : "no metrics in these jobs";
      root.dataset.ready = "1";
      return;
    }
    const r = await fetch(root.dataset.metrics);
    const body = await r.json();
    plots.load(body.metrics);
    plots.redrawAll();
    root.dataset.ready = "1";
    const empty = () => (Object.keys(plots.raw).length ? "" : " · no metrics yet");
    if (["completed", "failed", "canceled"].includes(body.status)) { state.textContent = "job " + body.status + empty(); return; }
    const sep = root.dataset.stream.includes("?") ? "&" : "?";
    const es = new EventSource(root.dataset.stream + sep + "after=" + body.last_id);
    state.textContent = "live" + empty();
    es.addEventListener("points", (e) => {
      const touched = new Set();
      for (const [metric, key, x, y] of JSON.parse(e.data)) { plots.add(metric, key, x, y); touched.add(metric); }
      for (const m of touched) plots.draw(m);
      state.textContent = "live" + empty();
    });
    es.addEventListener("end", (e) => { state.textContent = "job " + JSON.parse(e.data).status + empty(); es.close(); });
    es.addEventListener("error", () => { state.textContent = "reconnecting…"; });
  }

  // ---------------------------------------------------------------- samples step slider
  function initSlider(slider) {
    const steps = JSON.parse(slider.dataset.steps), out = $("#step-value"), input = $("#step-input");
    const fmt = (s) => (Number.isInteger(s) ? String(s) : String(s));
    slider.addEventListener("input", () => { out.value = fmt(steps[+slider.value]); slider.setAttribute("aria-valuetext", "step " + out.value); });
    slider.addEventListener("change", () => { input.value = steps[+slider.value]; slider.form.submit(); });
  }


  // ---------------------------------------------------------------- chat playground
  function initPlayground(form) {
    const panes = $("#panes"), input = $("#pg-input"), state = $("#pg-state");
    let history = []; // per pane: list of messages
    const models = () => Array.from(form.querySelectorAll(".pg-model")).map((s) => s.value).filter(Boolean);
    const layout = () => {
      const ms = models();
      panes.innerHTML = "";
      history = ms.map(() => []);
      ms.forEach((m, i) => {
        const pane = document.createElement("section");
        pane.className = "pane"; pane.dataset.model = m; pane.setAttribute("aria-label", "Chat with " + m);
        const h = document.createElement("h3"); h.textContent = m;
        const log = document.createElement("div"); log.className = "pane-log"; log.setAttribute("aria-live", "polite");
        pane.appendChild(h); pane.appendChild(log); panes.appendChild(pane);
      });
    };
    const bubble = (pane, role, text) => {
      const d = document.createElement("div");
      d.className = "msg " + role;
      const r = document.createElement("span"); r.className = "role"; r.textContent = role;
      d.appendChild(r); d.appendChild(document.createTextNode(text));
      pane.querySelector(".pane-log").appendChild(d);
      return d;
    };
    form.querySelectorAll(".pg-model").forEach((s) => s.addEventListener("change", layout));
    $("#pg-clear").addEventListener("click", layout);
    layout();
    form.addEventListener("submit", async (e) => {
      e.preventDefault();
      const text = input.value.trim();
      if (!text) return;
      input.value = "";
      const ms = models();
      const system = form.elements.system.value.trim();
      state.textContent = "waiting for " + ms.length + " answer(s)…";
      await Promise.all(ms.map(async (m, i) => {
        const pane = panes.children[i];
        history[i].push({ role: "user", content: text });
        bubble(pane, "user", text);
        const messages = (system ? [{ role: "system", content: system }] : []).concat(history[i]);
        const body = { model: m, messages, max_tokens: +form.elements.max_tokens.value, temperature: +form.elements.temperature.value };
        try {
          const r = await fetch(form.dataset.endpoint, { method: "POST", headers: { "content-type": "application/json", "x-csrf-token": csrf() }, body: JSON.stringify(body) });
          const data = await r.json();
          if (!r.ok) { bubble(pane, "error", (data.error && data.error.message) || ("HTTP " + r.status)); return; }
          const answer = data.choices[0].message.content || "";
          history[i].push({ role: "assistant", content: answer });
          bubble(pane, "assistant", answer).classList.add("answer");
        } catch (err) { bubble(pane, "error", String(err)); }
      }));
      state.textContent = "";
    });
  }

  document.addEventListener("DOMContentLoaded", () => {
    const log = $("#log[data-stream]");
    if (log) initLog(log);
    const plots = $("#plots");
    if (plots) initPlots(plots);
    const slider = $("#step-slider");
    if (slider) initSlider(slider);
    const pg = $("#playground");
    if (pg) initPlayground(pg);
  });
})();
