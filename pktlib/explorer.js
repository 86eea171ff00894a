// The neuron explorer's viewer (pktlib.explorer): draws every <div class="pkt-explorer"> from the
// JSON in its <script class="pkt-explorer-data">. No libraries, no network, no kernel.
(function () {
  "use strict";
  var CSS = [
    ".pkt-explorer{border:1px solid var(--pst-color-border,#ccc);border-radius:6px;padding:.8em 1em;margin:1em 0;font-size:.92em}",
    ".pkt-explorer .pkt-controls{display:flex;flex-wrap:wrap;gap:.4em 1.2em;align-items:center;margin-bottom:.6em}",
    ".pkt-explorer label{font-weight:600;margin-right:.3em}",
    ".pkt-explorer select{max-width:22em}",
    ".pkt-explorer .pkt-tok{display:inline-block;font-family:var(--pst-font-family-monospace,monospace);white-space:pre;",
    "padding:0 .35em;margin:.1em .2em;border-radius:4px;border:1px solid transparent}",
    ".pkt-explorer .pkt-up{background:rgba(46,160,67,.18);border-color:rgba(46,160,67,.5)}",
    ".pkt-explorer .pkt-down{background:rgba(218,54,51,.15);border-color:rgba(218,54,51,.5)}",
    ".pkt-explorer table{border-collapse:collapse;width:100%;margin-top:.4em}",
    ".pkt-explorer th,.pkt-explorer td{border-bottom:1px solid var(--pst-color-border,#ddd);padding:.2em .5em;text-align:left;vertical-align:top}",
    ".pkt-explorer td code{white-space:pre-wrap;word-break:break-word}",
    ".pkt-explorer .pkt-head{margin:.3em 0}"
  ].join("");

  function el(tag, attrs, children) {
    var e = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) {
      if (k === "text") e.textContent = attrs[k]; else e.setAttribute(k, attrs[k]);
    });
    (children || []).forEach(function (c) { e.appendChild(typeof c === "string" ? document.createTextNode(c) : c); });
    return e;
  }

  // Whitespace made visible, as Python's repr does: "\n" -> "\\n", a space stays a space.
  function show(t) { return String(t).replace(/\\/g, "\\\\").replace(/\n/g, "\\n").replace(/\t/g, "\\t"); }

  function select(name, options, onchange) {
    var s = el("select", {"aria-label": name});
    options.forEach(function (o) { s.appendChild(el("option", {value: String(o[0]), text: o[1]})); });
    s.addEventListener("change", onchange);
    return s;
  }

  function chips(items, cls) {
    return items.map(function (it) {
      return el("span", {"class": "pkt-tok " + cls, title: "logit " + (it[1] >= 0 ? "+" : "") + it[1].toFixed(2), text: show(it[0])});
    });
  }

  function fmt(x) { return (x >= 0 ? "+" : "") + x.toFixed(3); }

  function build(root) {
    var data = JSON.parse(root.querySelector("script.pkt-explorer-data").textContent);
    var roles = Object.keys(data.models), kinds = Object.keys(data.kinds);
    var st = {role: roles[0], family: data.families[0], kind: kinds[0], layer: 0, rank: 0};
    var fallback = root.querySelector(".pkt-explorer-fallback");
    if (fallback) fallback.remove();
    var controls = el("div", {"class": "pkt-controls"}), view = el("div", {"class": "pkt-view"});
    root.appendChild(controls);
    root.appendChild(view);
    var roleSel, famSel, kindSel, layerSel, neuronSel;

    // the layer's located neurons, best first by their summed score on the chosen family
    function rows() {
      var list = (data.models[st.role].kinds[st.kind].layers[String(st.layer)] || []).slice();
      var key = function (r) { var s = r.score[st.family]; return s === undefined ? -Infinity : s; };
      return list.sort(function (a, b) { return key(b) - key(a); });
    }

    // start where the chosen family's best neuron of this model and block sits
    function bestLayer() {
      var layers = data.models[st.role].kinds[st.kind].layers, best = 0, top = -Infinity;
      Object.keys(layers).forEach(function (l) {
        layers[l].forEach(function (r) { var s = r.score[st.family]; if (s !== undefined && s > top) { top = s; best = +l; } });
      });
      return best;
    }

    function fillLayers() {
      var n = data.models[st.role].n_layers, opts = [];
      for (var l = 0; l < n; l++) opts.push([l, "layer " + l]);
      var fresh = select("layer", opts, function () { st.layer = +fresh.value; st.rank = 0; fillNeurons(); draw(); });
      if (st.layer >= n) st.layer = n - 1;
      fresh.value = String(st.layer);
      layerSel.replaceWith(fresh); layerSel = fresh;
    }

    function fillNeurons() {
      var opts = rows().map(function (r, i) {
        var s = r.score[st.family];
        return [i, "neuron " + r.neuron + (s === undefined ? "" : " (score " + fmt(s) + ")")];
      });
      var fresh = select("neuron", opts, function () { st.rank = +fresh.value; draw(); });
      fresh.value = String(st.rank);
      neuronSel.replaceWith(fresh); neuronSel = fresh;
    }

    function draw() {
      view.textContent = "";
      var list = rows();
      if (!list.length) { view.appendChild(el("p", {text: "No located neurons in this layer."})); return; }
      var r = list[Math.min(st.rank, list.length - 1)], s = r.score[st.family];
      view.appendChild(el("p", {"class": "pkt-head"}, [el("b", {text: st.role}), ", " + data.kinds[st.kind] +
        " layer " + st.layer + ", neuron " + r.neuron + (s === undefined ? "" : ": summed score on " + st.family + " " + fmt(s))]));
      view.appendChild(el("p", {}, ["promotes "].concat(chips(r.promoted, "pkt-up"))));
      view.appendChild(el("p", {}, ["suppresses "].concat(chips(r.suppressed, "pkt-down"))));
      var acts = r.examples[st.family] || [];
      if (!acts.length) { view.appendChild(el("p", {text: "It raises the target token on no " + st.family + " example."})); return; }
      var table = el("table", {}, [el("tr", {}, ["example", "score", "target", "prompt → answer"].map(function (h) { return el("th", {text: h}); }))]);
      acts.forEach(function (a) {
        var e = data.examples[st.family][a[0]];
        table.appendChild(el("tr", {}, [el("td", {text: String(a[0])}), el("td", {text: fmt(a[1])}),
          el("td", {}, [el("code", {text: show(e.target[st.role] || "")})]),
          el("td", {}, [el("code", {text: show(e.prompt)}), " → ", el("code", {text: show(e.answer)})])]));
      });
      view.appendChild(el("p", {text: "Examples where it adds most to the answer's log-probability:"}));
      view.appendChild(table);
    }

    function jump() { st.layer = bestLayer(); st.rank = 0; fillLayers(); fillNeurons(); draw(); }
    roleSel = select("model", roles.map(function (r) { return [r, r]; }), function () { st.role = roleSel.value; jump(); });
    famSel = select("family", data.families.map(function (f) { return [f, f]; }), function () { st.family = famSel.value; st.rank = 0; fillNeurons(); draw(); });
    kindSel = select("block", kinds.map(function (k) { return [k, data.kinds[k]]; }), function () { st.kind = kindSel.value; jump(); });
    layerSel = el("select"); neuronSel = el("select");
    [["model", roleSel], ["family", famSel], ["block", kindSel], ["layer", layerSel], ["neuron", neuronSel]].forEach(function (p) {
      controls.appendChild(el("span", {}, [el("label", {text: p[0]}), p[1]]));
    });
    // the layer/neuron selects were placeholders until now: put the real ones in place
    st.layer = bestLayer();
    fillLayers(); fillNeurons(); draw();
    root.setAttribute("data-ready", "1");
  }

  function init() {
    if (!document.getElementById("pkt-explorer-css")) {
      var style = el("style", {id: "pkt-explorer-css"});
      style.textContent = CSS;
      document.head.appendChild(style);
    }
    var roots = document.querySelectorAll(".pkt-explorer:not([data-ready])");
    for (var i = 0; i < roots.length; i++) {
      try { build(roots[i]); } catch (err) { roots[i].setAttribute("data-error", String(err)); throw err; }
    }
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init); else init();
})();
