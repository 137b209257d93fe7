"""Optuna search over the fine-tuning settings, on the recipe's own training loop.

Modules, each importing only those above it in this list:

- ``names``: every file of a study folder and every attribute stored on studies and trials
- ``console``: what a running study prints (one line per trial, a progress bar)
- ``report``: ``trials.csv``, ``study_summary.json`` and plots, pure functions of a study
- ``space``: the ``search_space`` block: parsing, checks against the recipe, sampling a trial
- ``storage``: where a study lives (SQLite, any SQLAlchemy URL, a journal file) and heartbeats
- ``settings``: :class:`TuneSettings`, the one definition of the tuning settings (flags and YAML keys)
- ``sampling``: the sampler (seeded per trial) and the pruner
- ``objective``: one trial = the recipe's ``fine_tune`` with sampled settings, reported and pruned per evaluation
- ``best``: the best trial as a full run (``best_config.yaml``) and ``train_from_tuning``
- ``study``: open / resume / join a study, run it, write its outputs
- ``cli``: ``sonar-ft tune`` and ``sonar-ft train-from-tuning``
"""
