"""The book's tooling, kept apart from the research library: executing the chapters and building
the site (:mod:`~pktlib.book.build`), the Sphinx extensions that shape it
(:mod:`~pktlib.book.sphinx_ext`, :mod:`~pktlib.book.sphinx_fixes`), its pinned offline assets
(:mod:`~pktlib.book.assets`) and the rendered-book checker (:mod:`~pktlib.book.check`, over
headless Chromium: :mod:`~pktlib.book.chromium`)."""
from __future__ import annotations
