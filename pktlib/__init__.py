"""pktlib: cross-scale parametric knowledge transfer between language models.

Data flows one way: models/data -> attribution -> extraction -> hypernet -> injection ->
evaluation -> records -> plots -> book. Import submodules directly (``from pktlib import
attribution``); this package keeps its import light.
"""
__version__ = "0.1.0"
