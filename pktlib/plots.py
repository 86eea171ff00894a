"""Figure helpers shared by the notebooks (matplotlib/seaborn). Each returns the Figure."""
from __future__ import annotations

import matplotlib.pyplot as plt

__all__ = ["plt"]
