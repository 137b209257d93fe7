"""Memory and speed options of a fine-tuning run, one function per recipe flag.

``train()`` builds the encoder, the frozen decoder and the optimiser; the functions here turn the
flags ``--decoder_dtype``, ``--gradient_checkpointing``, ``--optimizer``, ``--cache_dtype`` and
``--compile`` into those objects' settings, with a :class:`~sonar_ft.errors.ConfigError` naming
the flag when a setting cannot work on this machine.
"""

from __future__ import annotations

import logging
from typing import Any, Iterable

import torch
from torch import nn

from sonar_ft.errors import ConfigError

log = logging.getLogger(__name__)

OPTIMIZERS = ("adamw", "adamw8bit")


NO_DECAY_NAMES = ("shared.weight", "feature_proj_scale")  # the tied embed_tokens copies are listed as shared.weight
"""Parameters kept out of weight decay besides norms and biases: the shared token embedding (of its
32,128 rows only the start token's is ever used; decay would shrink the rest, which nothing trains)
and the learned feature scale."""


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW parameter groups of ``model``'s trainable parameters: decay on weight matrices only.

    Norm weights, biases, the shared embedding and the feature scale get no weight decay (usual
    for T5 fine-tuning). With no decay, AdamW leaves an embedding row whose gradient is always zero
    exactly as loaded, so the unused vocabulary rows of the checkpoint stay untouched.
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():  # tied copies are listed once
        if not p.requires_grad:
            continue
        if p.ndim < 2 or name.endswith(NO_DECAY_NAMES):
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def grad_scaler(decoder_dtype_name: str, device: torch.device) -> torch.amp.GradScaler:
    """Dynamic loss scaling, on only while the frozen decoder runs in fp16 (``--decoder_dtype fp16``, a T4).

    The token loss is a mean over thousands of target tokens, so the gradient flowing back through
    the decoder's fp16 activations is ~1e-6 per element and below: in fp16 that is subnormal or zero.
    Scaling the loss (starting at 2**16) before the backward pass and the encoder's fp32 gradients
    back down before the optimiser step keeps them; a step whose scaled gradient overflows is skipped
    and the scale halved. bf16 has fp32's range and needs no scaling: the scaler is then a no-op.
    """
    return torch.amp.GradScaler(device.type, enabled=decoder_dtype_name == "fp16")


def build_optimizer(
    params: Iterable[nn.Parameter] | list[dict[str, Any]], name: str, *, lr: float, weight_decay: float,
    device: torch.device,
) -> torch.optim.Optimizer:
    """AdamW (``adamw``, fused on CUDA) or bitsandbytes' 8-bit AdamW (``adamw8bit``, CUDA only).

    ``params`` is a list of parameters or of parameter groups (:func:`parameter_groups`); a group's
    own ``weight_decay`` wins over ``weight_decay``. 8-bit AdamW keeps both moment estimates in
    8 bits (about 2 bytes per parameter instead of 8), which is what lets the official-size encoder
    train on a 16 GB GPU.
    """
    params = list(params)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=device.type == "cuda")
    if name == "adamw8bit":
        if device.type != "cuda":
            raise ConfigError("--optimizer adamw8bit needs a CUDA GPU (bitsandbytes); on this device use --optimizer adamw")
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise ConfigError(
                "--optimizer adamw8bit needs the bitsandbytes package: pip install bitsandbytes (or use --optimizer adamw)"
            ) from None
        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay)
    raise ConfigError(f"--optimizer must be one of {', '.join(OPTIMIZERS)} (got {name!r})")


def checkpoint_decoder_layers(model: nn.Module) -> int:
    """Recompute each layer of a fairseq2 transformer decoder in the backward pass; returns how many.

    ``model`` is the frozen SONAR decoder model (``FrozenTextDecoder.model``). Uses fairseq2's own
    layer-wise wrapper; it is a no-op for layers already wrapped. Under ``torch.no_grad`` /
    inference (generation) the wrapped layers run as before.
    """
    from fairseq2.models.utils.ac import apply_layerwise_ac
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

    layers = model.decoder.layers
    if all(isinstance(layer, CheckpointWrapper) for layer in layers):
        return len(layers)
    apply_layerwise_ac(layers, every_nth_layer=1)
    return len(layers)


def compile_encoder(encoder: nn.Module) -> nn.Module:
    """``torch.compile`` the encoder in place (state-dict keys unchanged), with dynamic shapes.

    Batches have a different number of frames each; ``dynamic=True`` avoids one recompilation per
    length. The first steps are slow while it compiles.
    """
    encoder.compile(dynamic=True)
    return encoder


def configure_encoder(encoder: nn.Module, cfg: Any) -> nn.Module:
    """Apply ``--freeze_encoder_layers``, ``--gradient_checkpointing`` and ``--compile`` (a ``TrainConfig``)."""
    encoder.freeze_encoder_layers(cfg.freeze_encoder_layers)
    encoder.gradient_checkpointing = cfg.gradient_checkpointing
    if cfg.compile:
        compile_encoder(encoder)
    return encoder

