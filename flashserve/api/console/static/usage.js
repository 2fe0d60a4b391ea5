// Usage charts (uPlot) from the JSON the page carries in <script type="application/json" id="usage-data">.
(function () {
  "use strict";
  document.addEventListener("DOMContentLoaded", function () {
    const source = document.getElementById("usage-data");
    if (!source || !window.uPlot) return;
    const data = JSON.parse(source.textContent);
    const days = data.by_day.map(function (row) { return Date.parse(row.group + "T00:00:00Z") / 1000; });
    const pick = function (key) { return data.by_day.map(function (row) { return Number(row[key]); }); };
    const css = getComputedStyle(document.documentElement);
    const color = function (name) { return css.getPropertyValue(name).trim() || "#888"; };
    const palette = [color("--accent"), "#e3a008", "#1a7f37", "#a371f7"];
    // Axis labels that stay readable for the tiny dollar amounts of a small model's requests.
    const ticks = function (u, values) {
      return values.map(function (v) { return v === 0 ? "0" : Math.abs(v) < 0.01 ? v.toPrecision(2) : String(+v.toFixed(2)); });
    };
    const bars = uPlot.paths && uPlot.paths.bars ? uPlot.paths.bars({ size: [0.6, 40] }) : undefined;
    const charts = {
      requests: [["requests", pick("requests"), true]],
      tokens: [["uncached prompt", data.by_day.map(function (r) { return r.prompt_tokens - r.cached_tokens; })],
               ["cached prompt", pick("cached_tokens")],
               ["completion", data.by_day.map(function (r) { return r.completion_tokens - r.reasoning_tokens; })],
               ["reasoning", pick("reasoning_tokens")]],
      cache: [["cache-hit %", data.by_day.map(function (r) { return 100 * r.cache_hit_ratio; })]],
      cost: [["USD", data.by_day.map(function (r) { return Number(r.cost_usd); }), true]],
    };
    document.querySelectorAll("[data-chart]").forEach(function (node) {
      const series = charts[node.dataset.chart];
      if (!days.length) { node.textContent = "No days in this range."; node.classList.add("muted"); return; }
      const width = Math.max(240, node.clientWidth || 300);
      const opts = {
        width: width, height: 180, legend: { live: false },
        axes: [{ stroke: color("--muted"), grid: { stroke: color("--border") } },
               { stroke: color("--muted"), grid: { stroke: color("--border") }, size: 60, values: ticks }],
        series: [{}].concat(series.map(function (s, i) {
          return { label: s[0], stroke: palette[i % palette.length], fill: palette[i % palette.length] + "33",
                   width: 2, paths: s[2] ? bars : undefined, points: { show: days.length < 3 } };
        })),
        // Half a day of margin each side, so the first and last days' bars are whole.
        scales: { x: { time: true, range: [days[0] - 43200, days[days.length - 1] + 43200] } },
      };
      const plot = new uPlot(opts, [days].concat(series.map(function (s) { return s[1]; })), node);
      window.addEventListener("resize", function () { plot.setSize({ width: Math.max(240, node.clientWidth), height: 180 }); });
    });
  });
})();
