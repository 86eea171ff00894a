"""A Sphinx extension with fixes for the rendered book (``sphinx: extra_extensions`` in _config.yml).

Duplicate inline scripts. Sphinx 7.4's HTML builder re-adds every registered script in
``prepare_writing`` as ``add_js_file(filename or '', ...)``; an inline script that an extension
registered *after* ``Builder.init()`` (sphinx-thebe at ``env-before-read-docs``,
sphinx-togglebutton at ``builder-inited``) was already added as ``filename=None``, and
``None != ''`` defeats the de-duplication. Every page then carries two copies, and the second
``const THEBE_JS_URL = ...`` throws "Identifier 'THEBE_JS_URL' has already been declared" in the
browser (found by ``pktlib.book.check``). This drops the repeats from each page's script list.
"""
from __future__ import annotations

from typing import Any


def dedupe_scripts(app, pagename: str, templatename: str, context: dict[str, Any], doctree) -> None:
    scripts = context.get("script_files")
    if not scripts:
        return
    seen, kept = set(), []
    for js in scripts:
        attrs = getattr(js, "attributes", {}) or {}
        key = (getattr(js, "filename", None) or "", tuple(sorted((k, str(v)) for k, v in attrs.items())))
        if key not in seen:
            seen.add(key)
            kept.append(js)
    scripts[:] = kept  # in place: the builder restores its own list before the next page


def setup(app) -> dict[str, Any]:
    app.connect("html-page-context", dedupe_scripts)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
