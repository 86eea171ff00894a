// Expressions the book checker (pktlib/book/check.py) evaluates in each page over the DevTools protocol.
// Two expressions, separated by the line "//== PAGE_PROBE ==".
(async () => {
  const mj = window.MathJax;
  if (!mj || !document.querySelector('script[src*="mathjax"]')) return 'none';
  const t0 = Date.now();
  while (!(mj.startup && mj.startup.promise) && Date.now() - t0 < 20000) await new Promise(r => setTimeout(r, 100));
  if (!(mj.startup && mj.startup.promise)) return 'not-started';
  const done = await Promise.race([mj.startup.promise.then(() => 'typeset'),
                                   new Promise(r => setTimeout(() => r('timeout'), 20000))]);
  return done;
})()
//== PAGE_PROBE ==
(() => {
  // the page's content (a selector list would return the theme's <main>, which also holds a
  // print-only copy of the title)
  const main = ['article.bd-article', 'article', '[role="main"]', 'main'].map(q => document.querySelector(q))
    .find(e => e) || document.body;
  const FOLLOWING = Node.DOCUMENT_POSITION_FOLLOWING;
  const visible = e => { const r = e.getBoundingClientRect(); return r.width >= 50 && r.height >= 50; };
  const decoded = im => im.complete && im.naturalWidth > 0;
  const bad_images = [...document.images].filter(im => !decoded(im))
    .map(im => im.getAttribute('src') ? im.getAttribute('src').slice(0, 120) : '(no src)');
  const shown = [...main.querySelectorAll('.cell_output img, figure img, .cell_output svg, figure svg')]
    .filter(e => !e.closest('mjx-container') && !(e.tagName === 'svg' && e.closest('figure img')));
  const rendered_figures = shown.filter(e => (e.tagName !== 'IMG' || decoded(e)) && visible(e));
  const uncaptioned = rendered_figures.filter(e => {
    const f = e.closest('figure'); const c = f && f.querySelector('figcaption');
    return !(c && c.innerText.trim().length > 0);
  }).map(e => (e.getAttribute('src') || e.tagName).slice(0, 100));
  // raw LaTeX: untypeset math elements, then TeX left in visible text outside code
  const untypeset = [...main.querySelectorAll('.math')]
    .filter(e => !e.querySelector('mjx-container') && !e.closest('mjx-container'))
    .map(e => e.textContent.trim().slice(0, 80));
  const SKIP = 'pre, code, script, style, textarea, mjx-container, .highlight, .cell_input, .pkt-explorer, .math';
  const TEX = /\\\(.+?\\\)|\\\[.+?\\\]|\$\$.+?\$\$|\\begin\{|\$[^$\n]{0,200}?\\[A-Za-z]{2,}[^$\n]*?\$/s;
  const walker = document.createTreeWalker(main, NodeFilter.SHOW_TEXT);
  const tex_text = [];
  let chunk = '';
  for (let n = walker.nextNode(); n; n = walker.nextNode()) {
    if (n.parentElement && n.parentElement.closest(SKIP)) continue;
    chunk += n.textContent;
  }
  const m = chunk.match(TEX);
  if (m) tex_text.push(m[0].slice(0, 80));
  const out_text = [...main.querySelectorAll('.cell_output')].map(e => e.innerText || '').join('\n');
  const tracebacks = [...main.querySelectorAll('.output.traceback, .output.error, .cell_output .traceback')]
    .map(e => (e.innerText || '').trim().split('\n').slice(-1)[0].slice(0, 120));
  if (!tracebacks.length && /Traceback \(most recent call last\)/.test(out_text)) tracebacks.push('Traceback in an output');
  const stderr = [...main.querySelectorAll('.output.stderr')].map(e => (e.innerText || '').trim().slice(0, 100));
  const pm = out_text.match(/\d{1,3}%\|[^|\n]*\|\s*[\d.]+[kMG]?\/[\d.?]+/);
  const progress = pm ? [pm[0].slice(0, 80)] : [];
  // the opening: title first, then a paragraph asking the chapter's question
  const h1 = main.querySelector('h1');
  const cells = [...main.querySelectorAll('.cell')];
  const cells_before_title = h1 ? cells.filter(c => c.compareDocumentPosition(h1) & FOLLOWING).length : 0;
  let opening = '';
  if (h1) {
    const stop = [...main.querySelectorAll('h2, .cell')].find(e => h1.compareDocumentPosition(e) & FOLLOWING);
    opening = [...main.querySelectorAll('p, blockquote, li')]
      .filter(p => (h1.compareDocumentPosition(p) & FOLLOWING) && !(stop && (stop.compareDocumentPosition(p) & FOLLOWING)))
      .map(p => p.innerText || '').join(' ');
  }
  const widgets = [...document.querySelectorAll('script[type="__WIDGET_MIME__"]')];
  const no_static = [];
  for (const s of widgets) {
    // The whole notebook cell: a static view may be another output of the same cell.
    const cell = s.closest('.cell') || s.closest('.cell_output') || s.parentElement;
    const rendered = cell.querySelector('.jupyter-widgets, .widget-area, .lm-Widget, .p-Widget');
    const clone = cell.cloneNode(true);
    clone.querySelectorAll('script, style, .cell_input, .highlight, button.copybtn').forEach(e => e.remove());
    const text = (clone.innerText || clone.textContent || '').trim();
    const img = clone.querySelector('img, svg');
    if (!rendered && !text && !img) {
      let model = '';
      try { model = JSON.parse(s.textContent).model_id || ''; } catch (e) {}
      no_static.push(model || s.textContent.slice(0, 60));
    }
  }
  const explorers = [...main.querySelectorAll('.pkt-explorer')];
  return {bad_images, n_figures: rendered_figures.length, uncaptioned, untypeset, tex_text, tracebacks, stderr,
          progress, is_chapter: cells.length > 0, has_title: !!h1, cells_before_title,
          opening: opening.slice(0, 2000), widgets: widgets.length, no_static,
          explorers: explorers.length,
          explorers_not_drawn: explorers.filter(e => !e.hasAttribute('data-ready')).map(e => e.id || '(no id)')};
})()
