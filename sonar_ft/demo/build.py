"""Build (once, cached) everything the offline demo needs under ``DEMO_DIR``.

Layout, relied on by ``make demo``, the notebooks and the tests::

    data/features/{train,val,test}/<id>.npy     (T, 768) float16 sign features
    data/manifests/{train,val,test}.tsv         id, length, text
    assets/tokenizer.model                      word-level SentencePiece model
    assets/text_decoder.{pt,yaml}               the demo "SONAR" text decoder + its asset card
    assets/text_encoder.{pt,yaml}               the demo "SONAR" text encoder (distillation teacher)
    assets/sonar_encoder_demo.pth               the starting sign encoder, official checkpoint layout
    assets/BUILD.json                           what was built, from which settings (the cache key)
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from sonar_ft import io
from sonar_ft.data import ManifestRow, write_manifest
from sonar_ft.demo import corpus
from sonar_ft.demo.text_models import TextModelConfig, pretrain_autoencoder, train_tokenizer
from sonar_ft.encoder import SignT5Config, SignT5SonarEncoder, save_encoder

log = logging.getLogger(__name__)

BUILD_VERSION = 1


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of the demo corpus and models (the defaults are what ``make demo`` builds)."""

    n_train: int = 600
    n_val: int = 60
    n_test: int = 100
    feature_dim: int = 768
    seed: int = 0
    text: TextModelConfig = field(default_factory=TextModelConfig)
    encoder_d_model: int = 64
    encoder_heads: int = 4
    encoder_d_kv: int = 16
    encoder_d_ff: int = 128
    encoder_layers: int = 2


@dataclass(frozen=True)
class DemoPaths:
    """Where the demo's pieces live under one root folder."""

    root: Path

    @property
    def features(self) -> Path:
        return self.root / "data" / "features"

    @property
    def manifests(self) -> Path:
        return self.root / "data" / "manifests"

    @property
    def assets(self) -> Path:
        return self.root / "assets"

    def split_features(self, split: str) -> Path:
        return self.features / split

    def split_manifest(self, split: str) -> Path:
        return self.manifests / f"{split}.tsv"

    @property
    def decoder_card(self) -> Path:
        return self.assets / "text_decoder.yaml"

    @property
    def text_encoder_card(self) -> Path:
        return self.assets / "text_encoder.yaml"

    @property
    def encoder_checkpoint(self) -> Path:
        return self.assets / "sonar_encoder_demo.pth"

    @property
    def build_record(self) -> Path:
        return self.assets / "BUILD.json"


def _build_key(cfg: DemoConfig) -> dict:
    return {"version": BUILD_VERSION, "config": asdict(cfg)}


def is_built(paths: DemoPaths, cfg: DemoConfig) -> bool:
    """True when ``paths`` already holds a complete build of ``cfg`` (the record is written last)."""
    import json

    if not paths.build_record.is_file():
        return False
    try:
        return json.loads(paths.build_record.read_text()) == _build_key(cfg)
    except ValueError:
        return False


def build_demo(root: str | Path, cfg: DemoConfig = DemoConfig(), *, force: bool = False) -> DemoPaths:
    """Build the demo corpus, text autoencoder and starting encoder under ``root`` (cached)."""
    paths = DemoPaths(Path(root))
    if is_built(paths, cfg) and not force:
        log.info("demo assets already built in %s", paths.root)
        return paths
    paths.assets.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)

    # 1. The sign corpus: held-out val/test sentences, features from gloss prototypes.
    splits = corpus.split_sentences(cfg.n_train, cfg.n_val, cfg.n_test, cfg.seed)
    prototypes = corpus.gloss_prototypes(cfg.feature_dim, cfg.seed)
    rng = np.random.default_rng(cfg.seed + 1)
    for split, sentences in splits.items():
        folder = paths.split_features(split)
        folder.mkdir(parents=True, exist_ok=True)
        rows = []
        for i, sentence in enumerate(sentences):
            clip_id = f"demo_{split}_{i:04d}"
            feats = corpus.sign_features(sentence, prototypes, rng).astype(np.float16)
            with io.atomic_path(folder / f"{clip_id}.npy") as tmp:
                with open(tmp, "wb") as f:
                    np.save(f, feats)
            rows.append(ManifestRow(id=clip_id, text=sentence.en, length=int(feats.shape[0]), line=i + 2))
        write_manifest(paths.split_manifest(split), rows)
    log.info("demo corpus: %s clips", {k: len(v) for k, v in splits.items()})

    # 2. The "pretrained SONAR" text autoencoder, on the whole grammar (as SONAR saw vast text).
    tokenizer = train_tokenizer(corpus.all_sentences(), paths.assets / "tokenizer.model")
    pretrain_autoencoder(corpus.all_sentences(), tokenizer, paths.assets, cfg.text)

    # 3. The starting sign encoder: SignT5 architecture, random weights, official checkpoint layout.
    enc_cfg = SignT5Config(
        feature_dim=cfg.feature_dim,
        d_model=cfg.encoder_d_model,
        d_kv=cfg.encoder_d_kv,
        d_ff=cfg.encoder_d_ff,
        num_heads=cfg.encoder_heads,
        num_encoder_layers=cfg.encoder_layers,
        num_decoder_layers=cfg.encoder_layers,
        vocab_size=8,
        output_dim=cfg.text.model_dim,
    )
    torch.manual_seed(cfg.seed)
    save_encoder(SignT5SonarEncoder(enc_cfg), paths.encoder_checkpoint)

    io.write_json(paths.build_record, _build_key(cfg))
    return paths
