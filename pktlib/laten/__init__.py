"""LaTen (Locate-Then-Align): pre-align parametric knowledge transfer (DESIGN.md 4.3).

Tan et al. 2025, "Neural Incompatibility", Section 4. The package:

* :mod:`pktlib.laten.method`: the configuration, locate, the loss, :func:`train` (the translator,
  in the loop of :mod:`pktlib.training`) and the settings stored with each checkpoint;
* :mod:`pktlib.laten.transfer`: :func:`apply`, a permanent transfer with a trained translator;
* :mod:`pktlib.laten.memory`: :func:`memory_estimate`, what one alignment step needs at scale;
* :mod:`pktlib.laten.sweeps`: :func:`sweep` over seeds x transfer rates, beside the plain
  student and teacher (the chapter's tables).
"""
from pktlib.laten.attributions import attribute_examples, cached_attribution
from pktlib.laten.memory import MemoryEstimate, memory_estimate
from pktlib.laten.method import (CONFIG_NAME, FAMILY_STEPS, SETTINGS_NAME, TABLE5_STEPS, LatenConfig, Located,
                                 TrainResult, check_pair, default_steps, default_train_on_inputs,
                                 find_checkpoint, laten_loss, locate, read_log, read_settings, train)
from pktlib.laten.sweeps import SweepRow, scale_matched_lr, sweep
from pktlib.laten.transfer import ApplyResult, apply

__all__ = [
    "TABLE5_STEPS", "FAMILY_STEPS", "CONFIG_NAME", "default_steps", "LatenConfig", "check_pair", "Located", "locate",
    "laten_loss", "cached_attribution", "attribute_examples", "TrainResult", "train", "ApplyResult", "apply", "find_checkpoint", "read_log",
    "read_settings", "default_train_on_inputs", "SETTINGS_NAME", "MemoryEstimate", "memory_estimate", "SweepRow",
    "sweep", "scale_matched_lr",
]
