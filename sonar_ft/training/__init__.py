"""Training: the recipe (``recipe.FineTuneRecipe`` and ``fine_tune(cfg)``) and what it stands on — the run
folder (``run_dir``), run records (``records``), where a run stands (``state``), several processes
(``distributed``), memory options (``perf``), progress and logs (``logs``), failures (``failures``),
``last.pt`` on local disk (``state_mirror``) and the command line (``cli``).

Imports data, models, evaluate and plan; nothing below imports it.
"""
