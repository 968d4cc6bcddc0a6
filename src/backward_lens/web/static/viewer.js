/* Backward Lens viewer: draws one explanation (the JSON of `backward-lens explain --json`).
 *
 * Shared by the standalone page and the server page. No dependencies, no network: the grid is a
 * table, the charts are SVG built here. Exposes window.BackwardLens.renderExplanation.
 */
(function () {
  "use strict";
  var BL = (window.BackwardLens = window.BackwardLens || {});
  var SVG = "http://www.w3.org/2000/svg";
  var COLORS = { ff1: [47, 111, 179], ff2: [214, 96, 43] };
  var READ = { ff1: "top", ff2: "bottom" };

  function el(tag, attrs, children) {
    var node = document.createElement(tag);
    setAttrs(node, attrs);
    append(node, children);
    return node;
  }
  function svg(tag, attrs, children) {
    var node = document.createElementNS(SVG, tag);
    setAttrs(node, attrs);
    append(node, children);
    return node;
  }
  function setAttrs(node, attrs) {
    for (var k in attrs || {}) {
      if (attrs[k] === null || attrs[k] === undefined) continue;
      if (k === "text") node.textContent = attrs[k];
      else if (k === "cls") node.setAttribute("class", attrs[k]);
      else node.setAttribute(k, attrs[k]);
    }
  }
  function append(node, children) {
    (children || []).forEach(function (c) {
      if (c === null || c === undefined) return;
      node.appendChild(typeof c === "string" ? document.createTextNode(c) : c);
    });
  }
  /** Tokens keep their spaces (white-space: pre); control characters become visible. */
  function vis(t) {
    return String(t).replace(/\n/g, "\u21b5").replace(/\r/g, "\u240d").replace(/\t/g, "\u21e5");
  }
  function tok(t) {
    return el("span", { cls: "bl-tok", text: vis(t) });
  }
  function fmtP(p) {
    if (p === 0) return "0";
    if (p >= 0.01) return p.toFixed(3);
    return p.toExponential(1);
  }
  function fmtN(x) {
    if (x === 0) return "0";
    if (Math.abs(x) >= 100 || Math.abs(x) < 0.01) return x.toExponential(2);
    return x.toPrecision(3);
  }
  BL.el = el;
  BL.tok = tok;
  BL.fmtP = fmtP;
  BL.fmtN = fmtN;

  /** Colour of a cell: log-scaled value in [lo, hi] mixed from white to the matrix's colour. */
  function scale(values) {
    var logs = values.filter(function (v) { return v > 0; }).map(Math.log);
    var lo = Math.min.apply(null, logs.length ? logs : [0]);
    var hi = Math.max.apply(null, logs.length ? logs : [1]);
    return function (v) {
      if (!(v > 0) || hi === lo) return v > 0 ? 1 : 0;
      return (Math.log(v) - lo) / (hi - lo);
    };
  }
  function mix(rgb, t) {
    var c = rgb.map(function (x) { return Math.round(255 + (x - 255) * t); });
    return "rgb(" + c.join(",") + ")";
  }
  /** The paper colours a cell by the VJP norm: FF1 by ||delta_i^FF1||, FF2 by ||delta_i||. */
  function vjpNorm(matrix, p) {
    return matrix === "ff1" ? p.coef_norm : p.norm;
  }

  function summary(data) {
    var t = data.target || {};
    var pred = data.prediction || {};
    var items = [
      ["model", data.model],
      ["target", tok(t.token)],
      ["prediction", el("span", {}, [tok(pred.token), " (p=" + fmtP(pred.prob) + ")"])],
      ["P(target)", fmtP(data.target_prob || 0)],
      ["loss", (data.loss || 0).toFixed(3)],
      ["lens", data.normalized ? "normalised" : "raw"],
      ["top-k", String(data.top_k)],
      ["vocabulary", String(data.vocab_size)],
    ];
    var box = el("div", { cls: "bl-summary", id: "bl-summary" });
    items.forEach(function (it) {
      box.appendChild(el("span", {}, [el("b", { text: it[0] + ": " }), it[1]]));
    });
    return el("div", {}, [
      el("div", { cls: "bl-mono", id: "bl-prompt" }, ["prompt: ", tok(data.prompt)]),
      box,
    ]);
  }

  function tooltipNode() {
    var tip = document.getElementById("bl-tooltip");
    if (!tip) {
      tip = el("div", { cls: "bl-tooltip", id: "bl-tooltip" });
      document.body.appendChild(tip);
    }
    return tip;
  }

  function tokenList(tokens, probs) {
    var rows = tokens.map(function (t, i) {
      return el("tr", {}, [el("td", {}, [tok(t)]), el("td", { text: fmtP(probs[i]) })]);
    });
    return el("table", {}, rows);
  }

  /** What a hover shows (also reused by the details panel). */
  BL.readingNode = function (data, matrix, layer, pos) {
    var p = layer[matrix].positions[pos];
    var V = data.vocab_size;
    var what = matrix === "ff1" ? "x_i (FF1 input)" : "\u03b4_i (FF2 VJP)";
    return el("div", {}, [
      el("div", {}, [
        el("b", { text: matrix.toUpperCase() + " \u00b7 layer " + layer.layer + " \u00b7 " }),
        tok(p.token),
        " (position " + pos + ")",
      ]),
      el("div", { cls: "bl-note", text: what + "; lens: " + (data.normalized ? "normalised" : "raw") }),
      el("table", { cls: "bl-kv" }, [
        el("tr", {}, [el("th", { text: "top " + p.top.length }), el("th", { text: "bottom " + p.bottom.length })]),
        el("tr", {}, [el("td", {}, [tokenList(p.top, p.top_probs)]), el("td", {}, [tokenList(p.bottom, p.bottom_probs)])]),
      ]),
      el("div", {}, [
        "target ", tok(data.target.token), " rank " + p.target_rank + " of " + V +
          " (0 = most probable, " + (V - 1) + " = least)",
      ]),
      el("div", {
        cls: "bl-note",
        text: "||" + (matrix === "ff1" ? "x_i" : "\u03b4_i") + "|| = " + fmtN(p.norm) + ", ||" +
          (matrix === "ff1" ? "\u03b4_i^FF1" : "x_i^FF2") + "|| = " + fmtN(p.coef_norm) +
          ", gradient term ||x_i||\u00b7||\u03b4_i|| = " + fmtN(p.norm * p.coef_norm),
      }),
    ]);
  };

  function grid(data, matrix, opts) {
    var layers = data.layers.slice().reverse(); // top layer first, as in the paper's Fig. 4
    var all = [];
    layers.forEach(function (l) { l[matrix].positions.forEach(function (p) { all.push(vjpNorm(matrix, p)); }); });
    var s = scale(all);
    var head = el("tr", {}, [el("th", { cls: "bl-layer", text: "layer" })]);
    data.tokens.forEach(function (t, i) {
      head.appendChild(el("th", { title: "position " + i }, [tok(t)]));
    });
    head.appendChild(el("th", { cls: "bl-layer", text: "rank", title: "rank of this layer's gradient (at most n = " + data.tokens.length + ")" }));
    var body = layers.map(function (l) {
      var row = el("tr", {}, [el("th", { cls: "bl-layer", text: String(l.layer) })]);
      l[matrix].positions.forEach(function (p, i) {
        var word = p[READ[matrix]][0];
        var t = s(vjpNorm(matrix, p));
        var cell = el("td", {
          cls: "bl-cell" + (word === data.target.token ? " bl-hit" : ""),
          "data-matrix": matrix,
          "data-layer": String(l.layer),
          "data-pos": String(i),
          "data-token": word,
          style: "background:" + mix(COLORS[matrix], 0.08 + 0.92 * t) + ";color:" + (t > 0.6 ? "#fff" : "#1d232b"),
        }, [tok(word)]);
        cell.addEventListener("mouseenter", function (ev) { opts.hover(ev, matrix, l, i); });
        cell.addEventListener("mousemove", function (ev) { opts.move(ev); });
        cell.addEventListener("mouseleave", function () { opts.leave(); });
        cell.addEventListener("click", function () { opts.click(cell, matrix, l, i); });
        row.appendChild(cell);
      });
      var title = "gradient rank of " + matrix.toUpperCase() + (l.gate ? "; gate: " + l.gate.rank : "");
      row.appendChild(el("td", { cls: "bl-rank", text: String(l[matrix].rank), title: title, "data-rank-layer": String(l.layer) }));
      return row;
    });
    var caption = matrix === "ff1"
      ? "FF1 imprint: most probable token of x_i; colour = ||\u03b4_i^FF1|| (log scale)"
      : "FF2 shift: least probable token of \u03b4_i; colour = ||\u03b4_i|| (log scale)";
    return el("div", { cls: "bl-gridwrap" }, [
      el("h3", { text: caption }),
      el("table", { cls: "bl-grid", id: "bl-grid-" + matrix }, [el("thead", {}, [head]), el("tbody", {}, body)]),
    ]);
  }

  /** Target rank by layer at the last position, for FF1's x and FF2's delta. */
  function rankChart(data) {
    var W = 460, H = 250, L = 60, R = 110, T = 16, B = 36;
    var V = data.vocab_size, n = data.tokens.length;
    var layers = data.layers.map(function (l) { return l.layer; });
    var lo = Math.min.apply(null, layers), hi = Math.max.apply(null, layers);
    function x(layer) { return L + (hi === lo ? 0.5 : (layer - lo) / (hi - lo)) * (W - L - R); }
    function y(rank) { return T + (rank / Math.max(1, V - 1)) * (H - T - B); }
    var root = svg("svg", { width: W, height: H, id: "bl-rank-chart", role: "img" });
    root.appendChild(svg("rect", { x: L, y: T, width: W - L - R, height: H - T - B, fill: "#f6f8fa" }));
    [0, 0.25, 0.5, 0.75, 1].forEach(function (f) {
      var r = Math.round(f * (V - 1));
      root.appendChild(svg("line", { x1: L, x2: W - R, y1: y(r), y2: y(r), stroke: "#d9dee4" }));
      root.appendChild(svg("text", { x: L - 4, y: y(r) + 4, "text-anchor": "end", text: String(r) }));
    });
    var step = Math.max(1, Math.ceil(layers.length / 10));
    layers.forEach(function (layer, k) {
      if (k % step === 0 || k === layers.length - 1)
        root.appendChild(svg("text", { x: x(layer), y: H - B + 14, "text-anchor": "middle", text: String(layer) }));
    });
    root.appendChild(svg("text", { x: (L + W - R) / 2, y: H - 4, "text-anchor": "middle", text: "layer" }));
    root.appendChild(svg("text", { x: 12, y: T + (H - T - B) / 2, transform: "rotate(-90 12 " + (T + (H - T - B) / 2) + ")", "text-anchor": "middle", text: "target rank" }));
    ["ff1", "ff2"].forEach(function (m, j) {
      var color = mix(COLORS[m], 1);
      var pts = data.layers.map(function (l) { return [x(l.layer), y(l[m].positions[n - 1].target_rank)]; });
      root.appendChild(svg("polyline", { points: pts.map(function (p) { return p.join(","); }).join(" "), fill: "none", stroke: color, "stroke-width": 2 }));
      data.layers.forEach(function (l, k) {
        var r = l[m].positions[n - 1].target_rank;
        root.appendChild(svg("circle", { cx: pts[k][0], cy: pts[k][1], r: 3, fill: color, "data-matrix": m, "data-layer": String(l.layer), "data-rank": String(r) }, [
          svg("title", { text: m.toUpperCase() + " layer " + l.layer + ": rank " + r }),
        ]));
      });
      root.appendChild(svg("rect", { x: W - R + 10, y: T + 6 + j * 18, width: 12, height: 3, fill: color }));
      root.appendChild(svg("text", { x: W - R + 26, y: T + 10 + j * 18, text: m === "ff1" ? "FF1 x_n" : "FF2 \u03b4_n" }));
    });
    return el("div", {}, [
      el("h3", { text: "Target rank by layer at the last token" }),
      el("div", { cls: "bl-note", text: "0 = most probable, " + (V - 1) + " = least probable. FF1 is read from the top, FF2 from the bottom." }),
      root,
    ]);
  }

  var HEAT = {
    vjp: ["VJP norm ||\u03b4_i||", function (m, p) { return vjpNorm(m, p); }],
    term: ["gradient term ||x_i||\u00b7||\u03b4_i||", function (m, p) { return p.norm * p.coef_norm; }],
    input: ["input norm ||x_i||", function (m, p) { return m === "ff1" ? p.norm : p.coef_norm; }],
  };

  function heatmap(data, which) {
    var n = data.tokens.length, nl = data.layers.length;
    var cw = Math.max(14, Math.min(40, Math.floor(360 / n))), ch = Math.max(6, Math.min(14, Math.floor(300 / nl)));
    var L = 34, T = 8, gap = 40;
    var W = L + 2 * n * cw + gap + 10, H = T + nl * ch + 80;
    var root = svg("svg", { width: W, height: H, id: "bl-heatmap", role: "img" });
    ["ff1", "ff2"].forEach(function (m, j) {
      var f = HEAT[which][1];
      var vals = [];
      data.layers.forEach(function (l) { l[m].positions.forEach(function (p) { vals.push(f(m, p)); }); });
      var s = scale(vals);
      var x0 = L + j * (n * cw + gap);
      data.layers.forEach(function (l, r) {
        var yy = T + (nl - 1 - r) * ch;
        if (j === 0 && (r % Math.max(1, Math.ceil(nl / 10)) === 0 || r === nl - 1))
          root.appendChild(svg("text", { x: L - 4, y: yy + ch - 1, "text-anchor": "end", text: String(l.layer) }));
        l[m].positions.forEach(function (p, i) {
          var v = f(m, p);
          root.appendChild(svg("rect", { x: x0 + i * cw, y: yy, width: cw - 1, height: ch - 1, fill: mix(COLORS[m], 0.05 + 0.95 * s(v)) }, [
            svg("title", { text: m.toUpperCase() + " layer " + l.layer + ", " + JSON.stringify(p.token) + ": " + fmtN(v) }),
          ]));
        });
      });
      data.tokens.forEach(function (t, i) {
        var xx = x0 + i * cw + cw / 2, yy = T + nl * ch + 6;
        root.appendChild(svg("text", { x: xx, y: yy, transform: "rotate(60 " + xx + " " + yy + ")", text: vis(t).slice(0, 10) }));
      });
      root.appendChild(svg("text", { x: x0, y: H - 4, text: m.toUpperCase() }));
    });
    return root;
  }

  function heatmapBlock(data) {
    var select = el("select", { id: "bl-heat-select" });
    Object.keys(HEAT).forEach(function (k) { select.appendChild(el("option", { value: k, text: HEAT[k][0] })); });
    var holder = el("div", {}, [heatmap(data, "vjp")]);
    select.addEventListener("change", function () {
      holder.replaceChild(heatmap(data, select.value), holder.firstChild);
    });
    return el("div", {}, [
      el("h3", { text: "Norms by layer and token (log colour scale)" }),
      el("div", { cls: "bl-note" }, ["show: ", select]),
      holder,
    ]);
  }

  /**
   * Draw `data` into `root`. opts.onCellClick(matrix, layerIndex, position, detailsNode) lets the
   * server page fetch more (neurons); by default a click shows the cell's reading in the panel.
   */
  BL.renderExplanation = function (root, data, opts) {
    opts = opts || {};
    root.innerHTML = "";
    var tip = tooltipNode();
    var details = el("div", { cls: "bl-panel", id: "bl-details" }, [
      el("span", { cls: "bl-note", text: "Click a cell for its details." }),
    ]);
    var selected = null;
    var handlers = {
      hover: function (ev, matrix, layer, pos) {
        tip.innerHTML = "";
        tip.appendChild(BL.readingNode(data, matrix, layer, pos));
        tip.style.display = "block";
        handlers.move(ev);
      },
      move: function (ev) {
        var w = tip.offsetWidth, h = tip.offsetHeight;
        var x = ev.clientX + 14, y = ev.clientY + 14;
        if (x + w > window.innerWidth) x = Math.max(0, ev.clientX - w - 14);
        if (y + h > window.innerHeight) y = Math.max(0, ev.clientY - h - 14);
        tip.style.left = x + "px";
        tip.style.top = y + "px";
      },
      leave: function () { tip.style.display = "none"; },
      click: function (cell, matrix, layer, pos) {
        if (selected) selected.classList.remove("bl-selected");
        selected = cell;
        cell.classList.add("bl-selected");
        details.innerHTML = "";
        details.appendChild(BL.readingNode(data, matrix, layer, pos));
        details.appendChild(el("div", { cls: "bl-note", text: "gradient rank of this layer's " + matrix.toUpperCase() + ": " + layer[matrix].rank }));
        if (opts.onCellClick) opts.onCellClick(matrix, layer.layer, pos, details);
      },
    };
    append(root, [
      summary(data),
      el("div", { cls: "bl-legend", text: "Rows: layers (top layer first). Columns: prompt tokens. Hover a cell for its top and bottom tokens; click it for details. Underlined: the target token." }),
      el("div", { cls: "bl-grids" }, [grid(data, "ff1", handlers), grid(data, "ff2", handlers)]),
      details,
      el("div", { cls: "bl-charts" }, [rankChart(data), heatmapBlock(data)]),
    ]);
  };

  /** Standalone page: the data is embedded in a JSON script tag. */
  BL.standalone = function () {
    var data = JSON.parse(document.getElementById("bl-data").textContent);
    BL.renderExplanation(document.getElementById("bl-root"), data, {});
  };
})();
