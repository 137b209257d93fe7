"""sonar-ft: fine-tune the SONAR ASL encoder on How2Sign against the frozen SONAR text decoder.

The package follows the data flow, one module per box::

    sonar_ft.data      manifests + feature files -> validated dataset -> length-bucketed batches
    sonar_ft.models.encoder   SignT5 SONAR encoder: features (B, T, D) -> sentence embedding (B, 1024)
    sonar_ft.models.decoder   frozen SONAR text decoder: embedding -> token loss / beam-search text
    sonar_ft.config    the run's settings (one dataclass; flags, --config files and tuning are generated from it)
    sonar_ft.training.recipe    the training loop, read top to bottom (FineTuneRecipe: setup, train, validate, save)
    sonar_ft.training.run_dir     train(config) for the recipe and tuning; output folder, run records, data splits
    sonar_ft.training.logs   progress lines / bars, steps.jsonl, TensorBoard, train.log
    sonar_ft.evaluate  BLEU / chrF and predictions
    sonar_ft.export.pack    tarball of a fine-tuned encoder, and loading it back
    sonar_ft.tune            Optuna search over training settings (space, settings, storage, study, objective, ...)
"""

__version__ = "0.1.0"
