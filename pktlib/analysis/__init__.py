"""Analyses of neural incompatibility and the statistics that compare methods (DESIGN.md 4.6).

* :mod:`pktlib.analysis.cka`: representation similarity (CKA) between two models' layers;
* :mod:`pktlib.analysis.structure`: parametric structural similarity of LoRA initialisations;
* :mod:`pktlib.analysis.deltas`: ranges of delta parameters (SFT deltas, Seeking's extracts);
* :mod:`pktlib.analysis.inspection`: the tokens a neuron promotes, the neurons that carried an answer;
* :mod:`pktlib.analysis.stats`: Wilson intervals, the paired (exact McNemar) test and its per-question form
  over several runs (seeds) a side.

Import the module you need (``from pktlib.analysis import cka``); the package itself imports
nothing, so the statistics stay light for :mod:`pktlib.evaluation`.
"""
