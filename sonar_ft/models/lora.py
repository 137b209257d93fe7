"""Low-rank adapters (LoRA, with the ``peft`` library) for the SONAR ASL encoder.

With ``--lora_rank r`` > 0 the encoder's weights stay frozen; every targeted ``nn.Linear`` gets a
trainable update ``B @ A * alpha / r`` (A: r x in, B: out x r, B starts at zero so training starts
from the pretrained encoder exactly), and a few small modules stay fully trainable.

What the rest of sonar-ft sees:

- ``apply_lora(encoder, cfg) -> (model, params)``: injects the adapters *into* ``encoder`` (the
  same object keeps working for forward, evaluation, DDP) and returns peft's wrapper and the
  trainable parameters;
- ``merged_state_dict(encoder)``: the official-layout state dict with every update folded into its
  weight, so ``best_encoder.pt`` loads with :func:`sonar_ft.models.encoder.load_encoder` as before;
- ``save_adapter(model, folder)``: the adapter alone in peft's format (``adapter_config.json`` +
  ``adapter_model.safetensors``, loadable with ``peft.PeftModel.from_pretrained``);
- ``trainable_state_dict`` / ``load_trainable_state_dict``: what ``last.pt`` holds under LoRA,
  only the tensors that train.

Settings (``TrainConfig`` fields): ``lora_rank``, ``lora_alpha``, ``lora_dropout``,
``lora_targets``, ``lora_trainable``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sonar_ft.files import atomic
from sonar_ft.config import TrainConfig, parse_names
from sonar_ft.errors import CheckpointError, ConfigError

log = logging.getLogger(__name__)

ADAPTER_NAME = "default"

DEFAULT_TARGETS = TrainConfig.lora_targets
DEFAULT_TRAINABLE = TrainConfig.lora_trainable

_PEFT_INFIX = ".base_layer"  # peft keeps a wrapped Linear's own weight under <name>.base_layer.weight
_SAVED_COPY = f".modules_to_save.{ADAPTER_NAME}."  # ... a fully trained module's trained copy here
_ORIGINAL = ".original_module."  # ... and its frozen original here


def apply_lora(encoder: nn.Module, cfg: Any) -> tuple[nn.Module, list[nn.Parameter]]:
    """Inject LoRA adapters into ``encoder`` in place; return ``(peft_model, trainable_parameters)``.

    Every base weight is frozen except those of the modules named in ``cfg.lora_trainable``.
    ``encoder`` itself keeps computing base + adapter, so evaluation and DDP can go on using it.
    """
    from peft import LoraConfig, get_peft_model

    targets = parse_names(cfg.lora_targets)
    linear_names = {name.rsplit(".", 1)[-1] for name, m in encoder.named_modules() if isinstance(m, nn.Linear)}
    # The FFN input is ``wi`` (ReLU T5) or ``wi_0`` / ``wi_1`` (gated T5-v1.1): the default names both.
    unknown = [t for t in targets if t not in linear_names | {"wi", "wi_0", "wi_1"}]
    if unknown:
        raise ConfigError(
            f"--lora_targets names {', '.join(unknown)}, which are not Linear layers of this encoder; "
            f"choose from {', '.join(sorted(linear_names))}"
        )
    keep = parse_names(cfg.lora_trainable)
    modules = dict(encoder.named_modules())
    suffixes = {name.rsplit(".", 1)[-1] for name in modules if name}
    missing = [k for k in keep if k not in suffixes]
    if missing:
        raise ConfigError(f"--lora_trainable names {', '.join(missing)}, which are not modules of this encoder")
    config = LoraConfig(
        r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, bias="none",
        # Only names that exist (``wi`` or ``wi_0``/``wi_1``, depending on the architecture).
        target_modules=[t for t in targets if t in linear_names],
        # peft trains a copy of each of these in full and saves it with the adapter, so that
        # base encoder + adapter folder is the whole fine-tuned encoder.
        modules_to_save=keep or None,
    )
    model = get_peft_model(encoder, config, adapter_name=ADAPTER_NAME)  # freezes every base weight
    params = [p for p in encoder.parameters() if p.requires_grad]
    log.info("LoRA rank %d on %s: %s trainable of %s parameters", cfg.lora_rank, ",".join(targets),
             f"{sum(p.numel() for p in params):,}", f"{sum(p.numel() for p in dict.fromkeys(encoder.parameters())):,}")
    return model, params


def is_lora(encoder: nn.Module) -> bool:
    """Whether ``encoder`` carries LoRA adapters (without importing peft for encoders that do not)."""
    return any(hasattr(m, "lora_A") for m in _unwrap(encoder).modules())


def _unwrap(model: nn.Module) -> nn.Module:
    """The encoder inside a PeftModel / DDP wrapper (the object the adapters were injected into)."""
    model = getattr(model, "module", model)  # DistributedDataParallel
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The encoder's state dict in the official layout, each adapter folded into its weight.

    ``W + B @ A * alpha / r`` for every adapted Linear; nothing is changed in ``model``.
    """
    from peft.tuners.lora import LoraLayer

    encoder = _unwrap(model)
    deltas = {
        f"{name}{_PEFT_INFIX}.weight": module.get_delta_weight(ADAPTER_NAME)
        for name, module in encoder.named_modules()
        if isinstance(module, LoraLayer) and ADAPTER_NAME in module.lora_A
    }
    merged: dict[str, torch.Tensor] = {}
    for key, value in encoder.state_dict().items():
        if ".lora_" in key or _ORIGINAL in key:
            continue
        if key in deltas:
            value = value + deltas[key].to(value.dtype)
        merged[key.replace(_PEFT_INFIX + ".", ".").replace(_SAVED_COPY, ".")] = value
    return merged


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the tensors that train (adapters and the fully trained modules), by their peft names."""
    encoder = _unwrap(model)
    return {name: p.detach().clone() for name, p in encoder.named_parameters() if p.requires_grad}


def load_trainable_state_dict(model: nn.Module, state: dict[str, torch.Tensor], *, source: str = "last.pt") -> None:
    """Load :func:`trainable_state_dict` output back; the names must match this run's exactly."""
    encoder = _unwrap(model)
    params = {name: p for name, p in encoder.named_parameters() if p.requires_grad}
    if set(params) != set(state):
        extra, missing = sorted(set(state) - set(params)), sorted(set(params) - set(state))
        raise CheckpointError(
            f"{source} was written by a run with other LoRA settings (unexpected: {extra[:3]}, missing: {missing[:3]}); "
            "resume with the settings it was written with, or start a new run (--overwrite / another --output_dir)"
        )
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state[name])


def save_adapter(model: nn.Module, folder: str | Path) -> Path:
    """Write the adapter in peft's format (``adapter_config.json``, ``adapter_model.safetensors``), atomically.

    It holds the LoRA matrices and the fully trained small modules (``--lora_trainable``): the
    starting encoder + this folder is the fine-tuned encoder.
    Load with ``peft.PeftModel.from_pretrained(starting_encoder, folder)``.
    """
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.torch import save_file

    peft_model = getattr(model, "module", model)  # DistributedDataParallel
    if not isinstance(peft_model, PeftModel):
        raise TypeError("save_adapter needs the PeftModel that apply_lora returned")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = peft_model.peft_config[ADAPTER_NAME]
    state = get_peft_model_state_dict(peft_model, adapter_name=ADAPTER_NAME)
    state = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    with atomic.atomic_path(folder / "adapter_model.safetensors") as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    record = config.to_dict()
    record["target_modules"] = sorted(record["target_modules"]) if record.get("target_modules") else None
    atomic.write_text(folder / "adapter_config.json", json.dumps(record, indent=2, sort_keys=True, default=str))
    return folder


def count_trainable(model: nn.Module) -> int:
    """Parameters that receive gradients."""
    return sum(p.numel() for p in _unwrap(model).parameters() if p.requires_grad)
