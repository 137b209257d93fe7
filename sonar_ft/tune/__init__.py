"""Optuna search over the fine-tuning settings, on the recipe's own training loop: the study (``study``),
what it leaves in its folder (``report``) and ``sonar-ft tune`` / ``train-from-tuning`` (``cli``).
"""
