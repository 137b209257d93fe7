"""Where the offline demo's pieces live (plain paths: the notebook kernel reads them without torch)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sonar_ft.demo.videos import DEMO_SIGNHIERA_NAME


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

    # ``make demo``'s video step (video in, text out).
    @property
    def videos(self) -> Path:
        return self.root / "videos"

    @property
    def random_signhiera(self) -> Path:
        """A small random-weight SignHiera (:func:`sonar_ft.demo.videos.save_random_signhiera`)."""
        return self.assets / DEMO_SIGNHIERA_NAME

    @property
    def video_features(self) -> Path:
        return self.root / "video_features"

    @property
    def video_translations(self) -> Path:
        return self.root / "video_translations.json"

    def recipe_settings(self, output_dir: str | Path, *, split: str = "val", encoder: str | Path | None = None) -> dict[str, str]:
        """The recipe's data and model settings on this demo (``TrainConfig`` names), evaluating on ``split``;
        :func:`sonar_ft.config.command_line` turns them into flags."""
        return {
            "encoder_checkpoint": str(encoder or self.encoder_checkpoint),
            "train_features": str(self.split_features("train")),
            "train_manifest": str(self.split_manifest("train")),
            "val_features": str(self.split_features(split)),
            "val_manifest": str(self.split_manifest(split)),
            "output_dir": str(output_dir),
            "decoder": str(self.decoder_card),
        }
