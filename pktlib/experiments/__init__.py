"""The experiments the book's chapters run, as library code returning tidy tables.

A chapter notebook keeps its parameters, calls into these modules and :mod:`pktlib.plots`, and
comments on the results; everything it computes lives here, under test. One module per chapter
or concept:

* :mod:`~pktlib.experiments.scoring`: generation budgets, the scorer shared by the transfer grids and
  scores cached beside a run;
* :mod:`~pktlib.experiments.verdict`: when one method beats another (2 s.e. over seeds and a paired
  test counting each question once);
* :mod:`~pktlib.experiments.paper`: the paper's numbers as the chapters show them (from the scorecard);
* :mod:`~pktlib.experiments.postalign_grid`: the Post-Align grid (Tables 1 and 2);
* :mod:`~pktlib.experiments.unaligned_grid`: the unaligned Pre-Align grid (Figure 2);
* :mod:`~pktlib.experiments.laten_sweep`: LaTen's sweeps (Tables 1, 3 and 5);
* :mod:`~pktlib.experiments.distillation`: the distillation baselines beside LaTen (Tables 7 and 8);
* :mod:`~pktlib.experiments.specialist`: stronger (specialist) sources for Post-Align and LaTen (Tables 2, 3, 6);
* :mod:`~pktlib.experiments.locating`: what attribution locates (depth, sparsity, stability);
* :mod:`~pktlib.experiments.cka`, :mod:`~pktlib.experiments.structural`, :mod:`~pktlib.experiments.deltas`:
  the three faces of neural incompatibility (Figures 3, 4 and 7-9);
* :mod:`~pktlib.experiments.real_model`: attribution on a pre-trained model;
* :mod:`~pktlib.experiments.measurement`: the Evaluation chapter (scorer checks, backends, protocols);
* :mod:`~pktlib.experiments.overview`, :mod:`~pktlib.experiments.pocket`: the pairs and tasks;
* :mod:`~pktlib.experiments.scale`: commands and memory for the paper's real pairs;
* :mod:`~pktlib.experiments.gains`: gains over the student for the scorecard.

Modules are imported by name (``from pktlib.experiments import postalign_grid``), so a chapter
loads only what it uses.
"""
