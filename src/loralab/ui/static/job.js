// The job page: polls /api/jobs/<id> (built from the files on disk) and draws the charts with uPlot.
(function () {
  const root = document.getElementById("job");
  const id = root.dataset.job;
  const kind = root.dataset.kind;
  let lossPlot = null, lrPlot = null, lrNames = "", shownSamples = "";
  const width = () => Math.min(900, document.querySelector("main").clientWidth - 20);

  function chart(el, title, names, data, colors) {
    const series = [{label: "step"}].concat(names.map((n, i) => ({
      label: n, stroke: colors[i % colors.length], width: i === 0 ? 1 : 2,
      points: {show: n.startsWith("validation"), size: 7}, spanGaps: false,
    })));
    return new uPlot({title: title, width: width(), height: 260, series: series,
                      scales: {x: {time: false}, y: {}},
                      axes: [{}, {size: 70, values: (u, vals) => vals.map(v => v == null ? "" : (v !== 0 && Math.abs(v) < 0.01) ? v.toExponential(1) : +v.toPrecision(4))}]},
                     data, el);
  }

  function render(info) {
    const status = document.getElementById("status");
    status.textContent = info.status;
    status.className = "status-" + info.status;
    if (info.device) document.getElementById("device").textContent = info.device;
    const err = document.getElementById("error");
    if (info.error) { err.textContent = info.error; err.hidden = false; }
    let p = "–";
    if (info.bar && info.bar.total) {
      p = `step ${info.bar.done} / ${info.bar.total}, elapsed ${info.bar.elapsed}, ETA ${info.bar.eta}`;
    }
    if (info.step) { p += ` · epoch ${info.epoch}, loss (moving average) ${info.loss.toFixed(4)}`; }
    document.getElementById("progress").textContent = p;
    document.getElementById("cancel-form").hidden = !["queued", "running"].includes(info.status);
    document.getElementById("resume-form").hidden = !info.resume_state;
    const review = document.getElementById("review-form");
    if (review) review.hidden = info.status !== "done" || info.review;
    document.getElementById("results-link").hidden = !(info.review || (["demo", "doctor", "train"].includes(kind) && info.status === "done"));
    const log = document.getElementById("log");
    const atEnd = log.scrollTop + log.clientHeight >= log.scrollHeight - 5;
    log.textContent = info.log;
    if (atEnd) log.scrollTop = log.scrollHeight;
    if (kind === "generate" && info.images.length && !document.querySelector("#images img")) {
      const box = document.getElementById("images");
      box.textContent = "";
      for (const f of info.images) {
        const img = document.createElement("img");
        img.className = "generated";
        img.src = `/jobs/${id}/files/${f}`;
        img.title = f;
        box.appendChild(img);
      }
    }
    if (kind !== "train") return;
    const c = info.chart;
    if (c.loss[0].length) {
      if (!lossPlot) {
        document.getElementById("loss-chart").textContent = "";
        lossPlot = chart(document.getElementById("loss-chart"), "training loss",
                         ["loss", "moving average", "validation"], c.loss, ["#9ab8d8", "#1f63a8", "#2a9d3a"]);
      } else lossPlot.setData(c.loss);
      const names = c.lr_names.join(",");
      if (!lrPlot || names !== lrNames) {
        if (lrPlot) lrPlot.destroy();
        lrNames = names;
        lrPlot = chart(document.getElementById("lr-chart"), "learning rate", c.lr_names, c.lr,
                       ["#c0392b", "#8e44ad", "#d68910"]);
      } else lrPlot.setData(c.lr);
    }
    const key = JSON.stringify(info.samples);
    if (key !== shownSamples && info.samples.length) {
      shownSamples = key;
      const box = document.getElementById("samples");
      box.textContent = "";
      for (const group of info.samples) {
        const row = document.createElement("div");
        row.className = "sample-row";
        const label = document.createElement("div");
        label.className = "sample-label";
        label.textContent = group.label;
        row.appendChild(label);
        for (const f of group.files) {
          const img = document.createElement("img");
          img.className = "sample";
          img.src = `/jobs/${id}/files/${f}`;
          img.title = f;
          row.appendChild(img);
        }
        box.appendChild(row);
      }
    }
  }

  async function poll() {
    let again = true;
    try {
      const r = await fetch(`/api/jobs/${id}`, {cache: "no-store"});
      if (r.ok) {
        const info = await r.json();
        render(info);
        again = ["queued", "running"].includes(info.status);
      }
    } catch (e) { /* the app restarting: try again */ }
    setTimeout(poll, again ? 1000 : 5000);
  }
  poll();
})();
