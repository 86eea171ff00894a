"""LaTen (Locate-Then-Align): pre-align parametric knowledge transfer (DESIGN.md 4.3).

Tan et al. 2025, "Neural Incompatibility", Section 4. The package:

* :mod:`pktlib.laten.method`: the configuration, locate, the loss, :func:`train` (the translator,
  in the loop of :mod:`pktlib.training`) and :func:`apply` (a permanent transfer);
* :mod:`pktlib.laten.memory`: :func:`memory_estimate`, what one alignment step needs at scale;
* :mod:`pktlib.laten.sweeps`: :func:`sweep` over seeds x transfer rates, beside the plain
  student and teacher (the chapter's tables).
"""
from pktlib.laten.memory import MemoryEstimate, memory_estimate
from pktlib.laten.method import (CONFIG_NAME, FAMILY_STEPS, TABLE5_STEPS, ApplyResult, LatenConfig, Located,
                                 TrainResult, apply, cached_attribution, check_pair, default_steps, find_checkpoint,
                                 laten_loss, locate, read_log, train)
from pktlib.laten.sweeps import SweepRow, scale_matched_lr, sweep

__all__ = [
    "TABLE5_STEPS", "FAMILY_STEPS", "CONFIG_NAME", "default_steps", "LatenConfig", "check_pair", "Located", "locate",
    "laten_loss", "cached_attribution", "TrainResult", "train", "ApplyResult", "apply", "find_checkpoint", "read_log",
    "MemoryEstimate", "memory_estimate", "SweepRow", "sweep", "scale_matched_lr",
]
