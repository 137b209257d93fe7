"""Where the offline demo's pieces live (plain paths: the notebook kernel reads them without torch)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


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
    def source(self) -> Path:
        return self.root / "source_domain"

    @property
    def build_record(self) -> Path:
        return self.assets / "BUILD.json"
