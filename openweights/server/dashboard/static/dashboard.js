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

  // axis numbers: distinct at the tick spacing, compact when large or tiny
  function fmtTick(v, incr) {
    if (v == null) return "";
    const a = Math.abs(v);
    if (a !== 0 && (a >= 1e5 || a < 1e-4)) return v.toExponential(a >= 1e5 ? 2 : 1).replace("e+", "e");
    // as many decimals as the tick spacing has (0.25 → 2, 0.0005 → 4), so no two ticks read alike
    let dec = 0;
    if (incr > 0) while (dec < 8 && Math.abs(Math.round(incr * 10 ** dec) - incr * 10 ** dec) > 1e-6) dec++;
    else dec = 2;
    return v.toFixed(dec);
  }
  const yAxis = {
    values: (u, splits, _ax, _space, incr) => splits.map((v) => fmtTick(v, incr)),
    size: (u, values) => (values ? Math.max(...values.map((v) => String(v).length), 2) * 7 + 18 : 50),
  };

  class Plots {
    constructor(root) {
      this.root = root;
      this.raw = {};    // metric -> series -> [xs, ys]
      this.charts = {}; // metric -> {u, box}
      this.smooth = 0;
      this.log = false;
      this.skip = [];   // metrics shown in the one-value table instead of a chart
      const s = $("#smoothing"), out = $("#smoothing-value"), lg = $("#logscale");
      // the view's settings live in the URL's fragment, so a link shows the same charts
      const view = new URLSearchParams(location.hash.slice(1));
      const keep = () => {
        const v = new URLSearchParams();
        if (this.smooth) v.set("smooth", String(this.smooth));
        if (this.log) v.set("log", "1");
        history.replaceState(null, "", location.pathname + location.search + (v.toString() ? "#" + v : ""));
      };
      if (s && view.get("smooth")) { s.value = view.get("smooth"); this.smooth = +s.value; out.value = s.value; }
      if (lg && view.get("log") === "1") { lg.checked = true; this.log = true; }
      if (s) s.addEventListener("input", () => { this.smooth = +s.value; out.value = s.value; this.redrawAll(); keep(); });
      if (lg) lg.addEventListener("change", () => { this.log = lg.checked; this.rebuildAll(); keep(); });
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
          axes: [{ label: "step" }, logOk ? { size: yAxis.size } : yAxis],
          series: [{ label: "step" }].concat(keys.map((k, i) => ({ label: k, stroke: this.color(k, i), width: 1.5, spanGaps: true, points: { show: data[0].length < 40 } }))),
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
    color(key, i) {
      // comparing jobs: one colour per job on every chart, so a job is the same line everywhere
      if (this.jobs) {
        const j = this.jobs.findIndex((id) => key.startsWith(id + " "));
        const n = this.jobs.length, within = this.seriesIndex(key);
        if (j >= 0) return COLORS[(j + within * n) % COLORS.length];
      }
      return COLORS[i % COLORS.length];
    }
    seriesIndex(key) {
      // the same series name (e.g. tag=a) gets the same offset for every job
      const rest = key.slice(key.indexOf(" ") + 1);
      this.names = this.names || [];
      let k = this.names.indexOf(rest);
      if (k < 0) { this.names.push(rest); k = this.names.length - 1; }
      return k;
    }
    singles() {
      // a metric with one point per series (a run's final summary: train_runtime, total_flos…)
      return Object.keys(this.raw).filter((m) => Object.values(this.raw[m]).every((s) => s[0].length <= 1));
    }
    insertSorted(box, metric) {
      // the curves researchers look at first, then the rest by name
      const FIRST = ["loss", "eval_loss", "logp_mean", "logp", "reward", "rewards", "learning_rate", "grad_norm"];
      const rank = (m) => { const i = FIRST.indexOf(m); return (i < 0 ? FIRST.length : i).toString().padStart(3, "0") + m; };
      const after = Array.from(this.root.children).find((el) => rank(el.dataset.metric) > rank(metric));
      this.root.insertBefore(box, after || null);
    }
    redrawAll() { for (const m in this.raw) if (!this.skip.includes(m)) this.draw(m); }
    singleTable(metrics) {
      // finished jobs: one-point metrics as a table, not as charts of a single dot
      const host = $("#single-values");
      if (!host || !metrics.length) return;
      const rows = [];
      for (const m of metrics.sort())
        for (const k of Object.keys(this.raw[m]).sort()) {
          const [xs, ys] = this.raw[m][k];
          rows.push([k, xs[0], ys[0]]);
        }
      const table = document.createElement("table");
      table.className = "grid"; table.id = "single-values-table";
      table.innerHTML = "<caption>Logged once (at one step)</caption><thead><tr><th scope=col>Metric</th><th scope=col>Step</th><th scope=col>Value</th></tr></thead>";
      const body = document.createElement("tbody");
      for (const [k, x, y] of rows) {
        const tr = document.createElement("tr");
        for (const v of [k, x, Number.isInteger(y) ? String(y) : Number(y.toPrecision(6)).toString()]) {
          const td = document.createElement("td"); td.textContent = v; tr.appendChild(td);
        }
        tr.dataset.metric = k;
        body.appendChild(tr);
      }
      table.appendChild(body);
      host.replaceChildren(table);
    }
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
      plots.jobs = ids;
      for (const id of ids) {
        const r = await fetch(root.dataset.prefix + "/jobs/" + encodeURIComponent(id) + "/metrics.json");
        if (r.ok) plots.load((await r.json()).metrics, id);
      }
      plots.skip = plots.singles();
      plots.redrawAll();
      plots.singleTable(plots.skip);
      state.textContent = Object.keys(plots.raw).length ? "" : "no metrics in these jobs";
      root.dataset.ready = "1";
      return;
    }
    const r = await fetch(root.dataset.metrics);
    const body = await r.json();
    plots.load(body.metrics);
    const done = ["completed", "failed", "canceled"].includes(body.status);
    const singles = done ? plots.singles() : [];
    plots.skip = singles;
    plots.redrawAll();
    plots.singleTable(singles);
    root.dataset.ready = "1";
    const empty = () => (Object.keys(plots.raw).length ? "" : " · no metrics yet");
    if (done) { state.textContent = "job " + body.status + empty(); return; }
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
    input.addEventListener("keydown", (e) => {  // Enter sends, Shift+Enter is a new line
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing) { e.preventDefault(); form.requestSubmit(); }
    });
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
          const b = bubble(pane, "assistant", answer || "(empty answer: the model stopped at once)");
          b.classList.add("answer");
          if (!answer) b.classList.add("empty");
          if (data.usage) b.title = data.usage.completion_tokens + " completion token(s)";
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
