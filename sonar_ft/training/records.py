"""A run's records: ``config.json`` (settings, architecture, versions, hardware, data hashes) and ``tokenizer.json``.

Everything a run used is written to its folder, so it can be reproduced from it.
"""

from __future__ import annotations

import platform
import subprocess
from dataclasses import asdict
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from sonar_ft.config import TrainConfig
from sonar_ft.device import hardware_record
from sonar_ft.files import atomic
from sonar_ft.models.decoder import FrozenTextDecoder
from sonar_ft.run_files import CONFIG_FILE, TOKENIZER_FILE


def git_record() -> dict[str, Any] | None:
    """The commit of the sonar-ft checkout this runs from and whether its tracked files were modified; None outside a checkout."""
    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True)
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, timeout=10, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("torch", "fairseq2", "sonar-space", "sacrebleu", "numpy", "sonar-ft"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def write_run_records(
    out: Path, cfg: TrainConfig, arch: dict[str, Any], decoder: FrozenTextDecoder, device: torch.device, precision: str,
    world_size: int = 1,
) -> None:
    """``config.json`` (settings, architecture, versions, data hashes) and ``tokenizer.json``."""
    data = {}
    for split in ("train", "val"):
        manifest = getattr(cfg, f"{split}_manifest")
        if manifest and Path(manifest).is_file():
            data[f"{split}_manifest_sha256"] = atomic.file_sha256(manifest)
    record = {
        "settings": asdict(cfg),
        "resolved": {"device": str(device), "precision": precision, "world_size": world_size,
                     "global_batch": cfg.batch_size * cfg.grad_accum * world_size},
        "encoder_architecture": arch,
        "encoder_checkpoint_sha256": atomic.checkpoint_sha256(cfg.encoder_checkpoint) if cfg.encoder_checkpoint else None,
        "versions": package_versions(),
        "hardware": hardware_record(device),
        "git": git_record(),
        "data": data,
    }
    atomic.write_json(out / CONFIG_FILE, record)
    atomic.write_json(out / TOKENIZER_FILE, tokenizer_record(cfg, decoder))


def tokenizer_record(cfg: TrainConfig, decoder: FrozenTextDecoder) -> dict[str, Any]:
    vocab = decoder.tokenizer.vocab_info
    return {
        "decoder": cfg.decoder,
        "tokenizer": cfg.tokenizer or cfg.decoder,
        # Local files as absolute paths: `sonar-ft export` packs them even when run from another folder.
        "decoder_file": str(Path(cfg.decoder).resolve()) if Path(cfg.decoder).is_file() else None,
        "tokenizer_file": str(Path(cfg.tokenizer).resolve()) if cfg.tokenizer and Path(cfg.tokenizer).is_file() else None,
        "tokenizer_family": "nllb",
        "tgt_lang": cfg.tgt_lang,
        "target_mode": "target",
        "target_prefix": ["</s>", f"__{cfg.tgt_lang}__"],
        "vocab_size": vocab.size,
        "special_ids": {"pad": vocab.pad_idx, "unk": vocab.unk_idx, "bos": vocab.bos_idx, "eos": vocab.eos_idx},
        "embedding_dim": decoder.embedding_dim,
    }
