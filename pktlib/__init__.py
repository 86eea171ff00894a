"""pktlib: cross-scale parametric knowledge transfer between language models.

Data flows one way: models/data -> training -> attribution -> extraction/seeking -> hypernet ->
injection -> methods (laten, baselines, postalign) -> analysis -> evaluation -> records -> plots ->
book; the README's layout table lists every module in that order. Import submodules directly
(``from pktlib import attribution``); this package keeps its import light.
"""
__version__ = "0.1.0"
