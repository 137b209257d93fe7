"""Every name a study uses, defined once: the files of a study folder and the attributes sonar-ft stores on
Optuna studies and trials (read back when a study is resumed, joined or reported).

Imports nothing: display code and other processes may read a study folder with these names.
"""

from __future__ import annotations

# -- files of the study folder (``--output_dir``) ---------------------------------------------------
DEFAULT_STUDY_DIR = "runs/tuning"
STUDY_DB = "study.db"
"""The default storage: SQLite in the study folder."""
TRIALS_DIR = "trials"
"""``trials/trial_NNNN``: one recipe run folder per trial."""
TRIAL_ERROR_FILE = "error.txt"
"""The traceback of a trial that failed with an unexpected error, in its folder."""
BEST_RUN_DIR = "best_run"
"""Where ``best_config.yaml`` sends the final training run."""
BEST_PARAMS_FILE = "best_hyperparameters.json"
BEST_CONFIG_FILE = "best_config.yaml"
TRIALS_CSV = "trials.csv"
SUMMARY_FILE = "study_summary.json"
PLOTS_DIR = "plots"

# -- study user attributes ------------------------------------------------------------------------
SPACE_ATTR = "sonar_ft:search_space"
"""The search space the study was created with (:func:`sonar_ft.tune.space.space_record`)."""
SETTINGS_ATTR = "sonar_ft:trial_settings"
"""The trial-budget settings of the first worker (warned about when a later one differs)."""
METRIC_ATTR = "sonar_ft:optimize"
"""The metric the study optimises: trials scored by another metric cannot share it."""

# -- trial user attributes ------------------------------------------------------------------------
TRIAL_SETTINGS = "settings"
"""Every recipe setting a trial ran with (``dataclasses.asdict(TrainConfig)``)."""
FAIL_REASON = "fail_reason"
FAIL_KIND = "fail_kind"
"""``trial`` (the settings failed: counts towards ``n_trials``), ``aborted`` (a study-wide problem),
``interrupted`` (Ctrl-C) or ``surplus`` (another worker filled the study first); the last three do not count."""
WORKER = "worker"
"""``host:pid`` (``/thread`` with ``n_jobs > 1``) of the worker that ran the trial."""
TRIAL_DIR_ATTR = "trial_dir"
EPOCHS_RUN = "epochs_run"
BEST_EPOCH = "best_epoch"
PRUNED_AT_EPOCH = "pruned_at_epoch"
# -- trial system attribute (Optuna's own name, also set by its heartbeat retry) -----------------------
RETRY_OF = "failed_trial"
"""On a re-queued trial: the number of the trial whose parameters it runs again."""
