/* Backward Lens viewer, server page: the form, progress, cell details and the edit panel.
 * Talks to the same-origin JSON API only (see backward_lens/web/server.py).
 */
(function () {
  "use strict";
  var BL = window.BackwardLens;
  var el = BL.el, tok = BL.tok, fmtP = BL.fmtP, fmtN = BL.fmtN;

  function sessionId() {
    var key = "backward-lens-session", id = null;
    try { id = window.sessionStorage.getItem(key); } catch (e) { id = null; }
    if (!id) {
      id = "s" + Math.random().toString(36).slice(2, 12) + Date.now().toString(36);
      try { window.sessionStorage.setItem(key, id); } catch (e) { /* private mode */ }
    }
    return id;
  }

  BL.app = function () {
    var config = JSON.parse(document.getElementById("bl-config").textContent);
    var lim = config.limits;
    var state = { normalized: false, result: null, busy: false, session: sessionId() };

    // ---- the form ----
    var prompt = el("input", { type: "text", id: "bl-prompt-input", maxlength: lim.max_prompt_chars, value: config.example.prompt });
    var target = el("input", { type: "text", id: "bl-target-input", maxlength: lim.max_target_chars, value: config.example.target });
    var model = el("select", { id: "bl-model" });
    config.models.forEach(function (m) { model.appendChild(el("option", { value: m, text: m })); });
    var topk = el("input", { type: "number", id: "bl-topk", min: 1, max: lim.max_top_k, value: 3 });
    var raw = el("button", { type: "button", id: "bl-lens-raw", cls: "bl-on", text: "raw lens" });
    var norm = el("button", { type: "button", id: "bl-lens-norm", text: "normalised lens" });
    var submit = el("button", { type: "button", id: "bl-submit", text: "Explain" });
    var status = el("div", { cls: "bl-status", id: "bl-status" });
    var buttons = [submit, raw, norm];

    var form = el("div", { cls: "bl-form" }, [
      el("div", {}, [el("label", { for: "bl-prompt-input", text: "prompt" }), prompt]),
      el("div", {}, [el("label", { for: "bl-target-input", text: "target (one token; a space is prepended)" }), target]),
    ]);
    var row = el("div", { cls: "bl-row" }, [
      el("div", {}, [el("label", { for: "bl-model", text: "model" }), model]),
      el("div", {}, [el("label", { for: "bl-topk", text: "top-k (1-" + lim.max_top_k + ")" }), topk]),
      el("div", {}, [el("label", { text: "lens" }), el("div", { cls: "bl-seg" }, [raw, norm])]),
      el("div", {}, [submit]),
    ]);
    var app = document.getElementById("bl-app");
    app.appendChild(form);
    app.appendChild(row);
    app.appendChild(status);
    [prompt, target].forEach(function (i) {
      i.addEventListener("keydown", function (ev) { if (ev.key === "Enter") explain(false); });
    });

    // ---- progress and requests ----
    var ticker = null, busyEl = null;
    /** Disable the buttons and show a spinner with the elapsed time in `where` (or clear it). */
    function setBusy(label, where) {
      state.busy = !!label;
      buttons.concat(editButtons).forEach(function (b) { b.disabled = !!label; });
      if (ticker) { clearInterval(ticker); ticker = null; }
      if (busyEl) { busyEl.className = "bl-status"; busyEl.textContent = ""; busyEl = null; }
      if (!label) return;
      var box = (busyEl = where || status), t0 = Date.now(), extra = "";
      function draw() {
        box.className = "bl-status bl-busy";
        box.textContent = label + " \u2026 " + ((Date.now() - t0) / 1000).toFixed(1) + " s" + extra;
      }
      draw();
      ticker = setInterval(function () {
        draw();
        fetch("/api/status").then(function (r) { return r.json(); }).then(function (s) {
          var m = (s.models || []).filter(function (x) { return x.name === model.value; })[0];
          if (!m) return;
          extra = m.state === "loading" ? " (loading " + m.name + ", first use)" :
            m.waiting > 0 ? " (waiting for the model: another request is running)" : "";
        }).catch(function () { /* ignore: the main request reports errors */ });
      }, 1000);
    }
    function showError(where, message) {
      where.className = "bl-status bl-error";
      where.textContent = message;
    }
    function post(url, body) {
      return fetch(url, {
        method: "POST",
        headers: { "Content-Type": "application/json" },
        body: JSON.stringify(body),
      }).then(function (r) {
        return r.json().catch(function () { return { error: "HTTP " + r.status }; }).then(function (data) {
          if (!r.ok || data.error) throw new Error(data.error || "HTTP " + r.status);
          return data;
        });
      });
    }

    function setLens(normalized) {
      state.normalized = normalized;
      raw.className = normalized ? "" : "bl-on";
      norm.className = normalized ? "bl-on" : "";
      if (state.result) explain(false);
    }
    raw.addEventListener("click", function () { if (state.normalized) setLens(false); });
    norm.addEventListener("click", function () { if (!state.normalized) setLens(true); });
    submit.addEventListener("click", function () { explain(false); });

    function explain(fresh) {
      if (state.busy) return Promise.resolve(null);
      setBusy("computing the backward lens");
      var body = {
        session: state.session, model: model.value, prompt: prompt.value, target: target.value,
        top_k: parseInt(topk.value, 10), normalized: state.normalized, fresh: !!fresh,
      };
      return post("/api/explain", body).then(function (data) {
        setBusy(null);
        state.result = data;
        status.className = "bl-status";
        status.textContent = (data.reused_capture ? "re-read the last capture" : "one forward + backward pass") +
          " in " + data.seconds.toFixed(2) + " s; " + data.n_layers + " layers." +
          (data.notes.length ? " Note: " + data.notes.join("; ") : "");
        BL.renderExplanation(document.getElementById("bl-root"), data.explanation, { onCellClick: cellDetails });
        return data;
      }).catch(function (err) {
        setBusy(null);
        showError(status, err.message);
        return null;
      });
    }

    // ---- cell details: the vector under both lenses and the neurons it dominates ----
    function cellDetails(matrix, layer, pos, panel) {
      var box = el("div", { id: "bl-cell-extra", cls: "bl-status bl-busy", text: "loading the neurons\u2026" });
      panel.appendChild(box);
      post("/api/cell", {
        session: state.session, matrix: matrix, layer: layer, position: pos,
        top_k: parseInt(topk.value, 10), normalized: state.normalized,
      }).then(function (d) {
        box.className = "";
        box.innerHTML = "";
        var g = d.gradient, side = d.reading;
        box.appendChild(el("div", { cls: "bl-note", text:
          "This position's term is " + (100 * g.position_term_share).toFixed(1) + "% of the summed term norms of the layer's " +
          matrix.toUpperCase() + " gradient (||G||=" + fmtN(g.norm) + ", rank " + g.rank + "); it dominates " +
          g.n_dominated + " of " + g.n_neurons + " neurons." }));
        var lensRows = ["raw", "normalized"].map(function (name) {
          var r = d.lens[name];
          return el("tr", {}, [el("th", { text: name }),
            el("td", {}, r.top.map(function (t, i) { return el("span", {}, [tok(t), " " + fmtP(r.top_probs[i]) + "  "]); })),
            el("td", {}, r.bottom.map(function (t, i) { return el("span", {}, [tok(t), " " + fmtP(r.bottom_probs[i]) + "  "]); })),
            el("td", { text: String(r.target_rank) })]);
        });
        box.appendChild(el("table", { cls: "bl-kv" }, [
          el("tr", {}, [el("th", { text: "lens" }), el("th", { text: "top" }), el("th", { text: "bottom" }), el("th", { text: "target rank" })]),
        ].concat(lensRows)));
        var rows = d.neurons.map(function (n) {
          var words = n[side], probs = n[side + "_probs"];
          return el("tr", { "data-neuron": String(n.index) }, [
            el("td", { text: String(n.index) }), el("td", { text: fmtN(n.norm) }),
            el("td", { text: (100 * n.share).toFixed(0) + "%" }), el("td", { text: n.cosine.toFixed(2) }),
            el("td", {}, words.map(function (t, i) { return el("span", {}, [tok(t), " " + fmtP(probs[i]) + "  "]); })),
            el("td", { text: String(n.target_rank) }),
          ]);
        });
        box.appendChild(el("h3", { text: "Top neurons of this gradient dominated by this cell (read from the " + side + ")" }));
        box.appendChild(rows.length ? el("table", { cls: "bl-kv", id: "bl-neurons" }, [
          el("tr", {}, ["neuron", "norm", "share", "cos", side + " tokens", "target rank"].map(function (h) { return el("th", { text: h }); })),
        ].concat(rows)) : el("div", { cls: "bl-note", text: "No neuron is dominated by this position." }));
      }).catch(function (err) { showError(box, err.message); });
    }

    // ---- edit panel ----
    var editRoot = document.getElementById("bl-edit");
    var layerIn = el("input", { type: "number", id: "bl-edit-layer", min: 0, placeholder: "auto" });
    var etaIn = el("input", { type: "number", id: "bl-edit-eta", step: "any", min: 0, max: lim.max_eta, placeholder: "auto" });
    var paraIn = el("textarea", { id: "bl-edit-para", placeholder: "one paraphrase prompt per line (up to " + lim.max_extra_prompts + ")" });
    var neighIn = el("textarea", { id: "bl-edit-neigh", placeholder: "one neighbourhood prompt per line (up to " + lim.max_extra_prompts + ")" });
    var apply = el("button", { type: "button", id: "bl-edit-apply", text: "Apply edit" });
    var revert = el("button", { type: "button", id: "bl-edit-revert", cls: "bl-secondary", text: "Revert and re-check", disabled: "disabled" });
    var editStatus = el("div", { cls: "bl-status", id: "bl-edit-status" });
    var editResult = el("div", { id: "bl-edit-result" });
    var editButtons = [apply, revert];
    var lastEdit = null;
    editRoot.appendChild(el("div", { cls: "bl-panel" }, [
      el("h2", { text: "Edit: forward pass shift" }),
      el("div", { cls: "bl-note", text: "Adds \u03b7 \u00b7 x_n\u1d40 e_target to one layer's FF2 (x_n: the last token's FF2 input), reads the predictions, then reverts. The server's model is never left edited." }),
      el("div", { cls: "bl-row" }, [
        el("div", {}, [el("label", { for: "bl-edit-layer", text: "layer (empty: model default)" }), layerIn]),
        el("div", {}, [el("label", { for: "bl-edit-eta", text: "\u03b7 in (0, " + lim.max_eta + "] (empty: default)" }), etaIn]),
      ]),
      el("div", { cls: "bl-form" }, [
        el("div", {}, [el("label", { text: "paraphrase prompts" }), paraIn]),
        el("div", {}, [el("label", { text: "neighbourhood prompts" }), neighIn]),
      ]),
      el("div", { cls: "bl-row" }, [apply, revert]),
      editStatus,
      editResult,
    ]));

    function predCell(p) {
      return el("td", {}, [tok(p.token), " (" + fmtP(p.prob) + ")"]);
    }
    apply.addEventListener("click", function () {
      if (state.busy) return;
      var body = {
        session: state.session, model: model.value, prompt: prompt.value, target: target.value,
        eta: etaIn.value === "" ? null : parseFloat(etaIn.value),
        paraphrases: paraIn.value, neighborhood: neighIn.value,
      };
      if (body.eta === null) delete body.eta;
      if (layerIn.value !== "") body.layer = parseInt(layerIn.value, 10);
      setBusy("applying the edit", editStatus);
      post("/api/edit", body).then(function (d) {
        setBusy(null);
        lastEdit = d;
        revert.disabled = false;
        editStatus.className = "bl-status";
        editStatus.textContent = (d.skipped ? "Skipped: the model already predicts the target, nothing to edit. " :
          "Applied " + d.method + " at layer " + d.layer + " with \u03b7=" + d.eta + " (||\u0394W||=" + fmtN(d.delta_norm) + "). ") +
          "Reverted after reading the predictions: the server model is unchanged.";
        editResult.innerHTML = "";
        var rows = d.rows.map(function (r) {
          var up = r.after.target_prob > r.before.target_prob;
          return el("tr", { "data-kind": r.kind }, [
            el("td", { text: r.kind }), el("td", {}, [tok(r.prompt)]),
            predCell(r.before), predCell(r.after),
            el("td", { cls: up ? "bl-up" : "bl-down", text: fmtP(r.before.target_prob) + " \u2192 " + fmtP(r.after.target_prob) }),
          ]);
        });
        editResult.appendChild(el("table", { cls: "bl-kv", id: "bl-edit-table" }, [
          el("tr", {}, ["kind", "prompt", "before", "after edit", "P(" + d.target.token + ")"].map(function (h) { return el("th", { text: h }); })),
        ].concat(rows)));
      }).catch(function (err) {
        setBusy(null);
        showError(editStatus, err.message);
      });
    });
    revert.addEventListener("click", function () {
      if (!lastEdit) return;
      var before = lastEdit.rows[0].before;
      editResult.innerHTML = "";
      revert.disabled = true;
      explain(true).then(function (data) {
        if (!data) return;
        var pred = data.explanation.prediction;
        var same = pred.token_id === before.token_id;
        editStatus.className = "bl-status" + (same ? "" : " bl-error");
        editStatus.id = "bl-edit-status";
        editStatus.textContent = same
          ? "Reverted: a fresh pass predicts " + JSON.stringify(pred.token) + " (p=" + fmtP(pred.prob) + ") again, as before the edit."
          : "Warning: the prediction differs from before the edit (" + JSON.stringify(pred.token) + ").";
        editStatus.setAttribute("data-reverted", same ? "yes" : "no");
        lastEdit = null;
      });
    });
  };
})();
