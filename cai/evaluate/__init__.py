"""Evaluation: the held-out judge's win rates, the baseline, head-to-head comparison of arms."""
