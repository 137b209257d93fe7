"""Data layer: manifests + feature files -> validated dataset -> length-bucketed batches.

Knows nothing of models. See ``docs/architecture.md`` for the contracts.
"""

from sonar_ft.data.dataset import (
    Batch,
    LengthBucketSampler,
    Sample,
    SignFeatureDataset,
    collate,
    make_loader,
    prepare_features,
    select_rows,
)
from sonar_ft.data.features import FeatureStore, feature_shape, load_feature_file, read_features
from sonar_ft.data.manifest import (
    ManifestRow,
    duplicate_ids,
    how2sign_to_tsv,
    read_manifest,
    write_manifest,
)
from sonar_ft.data.verify import VerifyReport, verify_dataset

__all__ = [
    "Batch",
    "FeatureStore",
    "LengthBucketSampler",
    "ManifestRow",
    "Sample",
    "SignFeatureDataset",
    "VerifyReport",
    "collate",
    "duplicate_ids",
    "feature_shape",
    "how2sign_to_tsv",
    "load_feature_file",
    "make_loader",
    "prepare_features",
    "read_features",
    "read_manifest",
    "select_rows",
    "verify_dataset",
    "write_manifest",
]
