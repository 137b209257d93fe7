"""The settings of a fine-tuning run, defined once: :class:`TrainConfig`.

Everything else is generated from this dataclass: the recipe's command line (``sonar-ft train``,
``train_sonar_finetuning.py``), the tuning CLI's override flags, ``--config run.yaml`` files and the
``settings`` block of ``config.json``. Allowed values are ``Literal`` types; each field's help is the
docstring under it; number ranges are checked in :meth:`TrainConfig.validate`.

Precedence: flags given on the command line > keys of ``--config run.yaml`` > the defaults.
Unknown keys and values of the wrong type are errors that name the key and the file.

This module imports no torch (``sonar-ft --help`` and display code stay fast).
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import inspect
import math
import re
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal, Mapping

from sonar_ft.errors import ConfigError
from sonar_ft.scores import METRICS, SEMANTIC_METRICS
from sonar_ft.scores import higher_is_better as maximize  # noqa: F401  (the one place that says which way a metric improves)

Metric = Literal[METRICS]  # type: ignore[valid-type]  # bleu, bleu1..4, chrf, rougeL, cosine, r1, r5, loss


REPORTERS = ("jsonl", "tensorboard")


@dataclass
class TrainConfig:
    """Every setting of a fine-tuning run; ``config.json`` in the output folder holds one of these."""

    # -- data ---------------------------------------------------------------------------------------
    train_features: str | None = None
    """Folder of training feature files (flat ``<id>.npy`` / ``<id>.pt`` or ssvp_slt's nested layout)."""
    train_manifest: str | None = None
    """Training manifest: TSV ``id [length] text`` or How2Sign's re-aligned CSV."""
    val_features: str | None = None
    """Folder of validation (or, with ``eval_only``, test) feature files."""
    val_manifest: str | None = None
    """Validation (or test) manifest."""
    allow_train_as_val: bool = False
    """Accept a validation manifest that is the training manifest (same file or same content); its scores then say nothing about unseen clips."""
    max_samples: int | None = None
    """Use at most this many clips of each split (quick tests)."""
    subset_fraction: float | None = None
    """Use this seeded fraction of the training clips (tuning)."""
    max_frames: int | None = None
    """Truncate longer clips to this many frames."""
    on_bad_sample: Literal["error", "skip"] = "error"
    """Clips that cannot be used (missing, unreadable, wrong shape, NaN/Inf, no frames, empty text, a reference longer than the decoder reads or than one sentence can be): ``error`` stops before training, listing all of them; ``skip`` trains without them. Both list them in ``bad_samples.tsv``."""
    num_workers: int = 0
    """Data-loading worker processes."""
    # -- models -------------------------------------------------------------------------------------
    encoder_checkpoint: str | None = None
    """The SONAR ASL encoder to start from (``dm_70h_ub_sonar_encoder.pth`` or a fine-tuned one)."""
    decoder: str = "text_sonar_basic_decoder"
    """Frozen SONAR text decoder: asset card name, card ``.yaml`` or checkpoint file."""
    tokenizer: str | None = None
    """Tokenizer: card name, card ``.yaml`` or SentencePiece model (default: the decoder's)."""
    text_encoder: str | None = None
    """SONAR text encoder: the distillation teacher when ``distill_weight > 0`` (default ``text_sonar_basic_encoder``)
    and, when given (or loaded for distillation), the source of the semantic scores (cosine, R@1, R@5) of every
    evaluation. Nothing is loaded or downloaded when it is not given and distillation is off."""
    tgt_lang: str = "eng_Latn"
    """FLORES-200 code of the target language."""
    freeze_decoder: bool = True
    """The decoder is always frozen; accepted so existing command lines keep working."""
    dropout: float | None = None
    """Encoder dropout (default: keep the architecture's 0.1)."""
    # -- optimisation -------------------------------------------------------------------------------
    batch_size: int = 8
    """Clips per micro-batch (per process under torchrun). Each optimiser step's clips are chosen at the effective batch
    ``batch_size x grad_accum`` and split into micro-batches, so the split may change on resume (another GPU)."""
    epochs: int = 10
    """Number of epochs."""
    learning_rate: float = 1e-4
    """AdamW learning rate."""
    weight_decay: float = 0.01
    """AdamW weight decay (never on norms, biases and the shared embedding)."""
    label_smoothing: float = 0.1
    """Label smoothing of the token loss."""
    grad_clip: float = 1.0
    """Max gradient norm; 0 disables clipping."""
    grad_accum: int = 1
    """Batches per optimiser step. The gradient is that of one batch of ``batch_size x grad_accum`` clips: every target token weighs the same."""
    warmup_steps: int = 0
    """Linear learning-rate warm-up over this many optimiser steps."""
    plateau_factor: float = 0.5
    """ReduceLROnPlateau: multiply the learning rate by this when the validation metric stalls."""
    plateau_patience: int = 2
    """ReduceLROnPlateau: evaluations without improvement before reducing."""
    early_stopping_patience: int = 0
    """Stop after this many evaluations without improvement; 0 disables."""
    distill_weight: float = 0.0
    """Weight of the distillation term towards the SONAR text embedding of the target; 0 disables."""
    distill_loss: Literal["mse", "cosine"] = "mse"
    """Distillation distance."""
    optimizer: Literal["adamw", "adamw8bit"] = "adamw"
    """``adamw``, or ``adamw8bit`` (bitsandbytes, CUDA only: 2 instead of 8 bytes of state per parameter)."""
    seed: int = 42
    """Random seed (data order, dropout, subsets)."""
    # -- LoRA (parameter-efficient fine-tuning, see sonar_ft.models.lora) ------------------------------------
    lora_rank: int = 0
    """Rank of the low-rank adapters; 0 fine-tunes every encoder weight (full fine-tuning)."""
    lora_alpha: float = 32.0
    """LoRA scale numerator: the update is ``B @ A * lora_alpha / lora_rank``."""
    lora_dropout: float = 0.0
    """Dropout on the adapters' input. Off by default: the encoder's own dropout already acts, and peft
    keeps a dropped-out copy of every adapted layer's input (CPU measurement: +65% saved activations at 0.1)."""
    lora_targets: str = "q,k,v,o,wi_0,wi_1,wi,wo"
    """Comma-separated names of the Linear layers that get adapters: attention (q, k, v, o; self- and cross-attention)
    and feed-forward (wi_0, wi_1 / wi, wo) projections of every block of both stacks."""
    lora_trainable: str = "feature_projection,final_layer_norm,projection_out"
    """Comma-separated names of small modules trained in full next to the adapters ("" for none): the input
    projection (the new signers' features enter there), the final RMS norms, the output projection into SONAR space."""
    # -- evaluation ---------------------------------------------------------------------------------
    eval_every: int = 1
    """Evaluate every N epochs (and always after the last)."""
    beam_size: int = 5
    """Beam size of the validation translations."""
    max_gen_len: int = 128
    """Maximum generated tokens per translation."""
    select_metric: Metric = "bleu"
    """Validation metric for the best checkpoint, plateau and early stopping (the loss is minimised, every other maximised)."""
    eval_only: bool = False
    """Evaluate ``encoder_checkpoint`` on the ``val_*`` split and write only ``test_results.json``."""
    write_predictions: bool = True
    """Write ``predictions_epoch{N}.json`` at each evaluation."""
    # -- system -------------------------------------------------------------------------------------
    output_dir: str = "runs/finetune"
    """Where metrics, predictions, logs and checkpoints go."""
    state_dir: str | None = None
    """Write ``last.pt`` and ``best_encoder.pt`` in this folder on a fast local disk (e.g. ``/content/sonar_state/run``)
    and copy them into ``--output_dir`` after each save, overwriting fixed files in place (``--state_slots``): on Google
    Drive a deleted or replaced 9 GB file stays in the trash and counts against the quota. The disk plan
    (``sonar-ft plan``) says when a run needs it. After a disconnect the newest complete copy comes back here."""
    state_slots: int = 1
    """With ``--state_dir``: copies of ``last.pt`` kept in ``--output_dir``, fixed files overwritten in place (Drive keeps
    no trash of them). 2: the previous copy survives a disconnect during the next copy; 1: one copy (a disconnect during
    its copy leaves none); 0: none (a disconnect loses the state: continue from ``best_encoder.pt`` as a new run)."""
    device: str = "auto"
    """``auto`` (CUDA when present), ``cuda``, ``cuda:N`` or ``cpu``."""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """``auto`` (bf16 on GPUs that support it, else fp32), ``bf16`` or ``fp32``. Never fp16."""
    resume: bool = False
    """Continue the run in ``output_dir`` from its ``last.pt``."""
    overwrite: bool = False
    """Replace another run's files in ``output_dir`` (deleted only once the new run has started)."""
    save_checkpoints: bool = True
    """Write ``best_encoder.pt`` / ``last.pt`` (tuning trials may switch this off)."""
    checkpoint_every_steps: int = 0
    """Also write the resumable ``last.pt`` every N optimiser steps inside an epoch (0: only at epoch ends)."""
    checkpoint_every_minutes: float = 0.0
    """Also write the resumable ``last.pt`` once this many minutes have passed since the last save (checked after each
    optimiser step; 0: off). A disconnect then costs at most these minutes; with ``--state_dir`` each save is also copied
    to the run folder (see ``sonar-ft plan`` for what that costs on Drive)."""
    loss_chunk_size: int = 256
    """Target positions per chunk of vocabulary logits in the loss (bounds its memory, see docs/benchmarks.md)."""
    # -- logging ------------------------------------------------------------------------------------
    log_every_steps: int = 10
    """Write a step record (loss, lr, gradient norm, throughput, memory) every N optimiser steps; 0 = off."""
    report_to: str = "jsonl,tensorboard"
    """Where step records go, comma-separated: ``jsonl`` (``steps.jsonl``), ``tensorboard`` (``tensorboard/``); empty = nowhere."""
    progress: Literal["auto", "bar", "plain", "none"] = "auto"
    """Progress display: ``bar`` (tqdm), ``plain`` (a line every ``progress_seconds`` and one per epoch), ``none``; ``auto`` = bars in a terminal, plain lines elsewhere (notebooks, log files)."""
    progress_seconds: float = 30.0
    """Seconds between two plain progress lines."""
    # -- memory and speed (``sonar-ft plan`` recommends these; see sonar_ft.training.perf) -------------------
    gradient_checkpointing: bool = False
    """Recompute encoder blocks and frozen-decoder layers in the backward pass instead of keeping their activations."""
    decoder_dtype: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Frozen decoder weights: ``fp32``, ``bf16``, or ``fp16`` (only on GPUs without bf16, e.g. a T4)."""
    freeze_encoder_layers: int = 0
    """Freeze the feature projection and the lowest N encoder blocks."""
    cache_features: bool = False
    """Keep every clip in memory after its first read: later epochs do not touch the disk / Drive."""
    cache_dtype: Literal["fp32", "fp16"] = "fp32"
    """Dtype of the feature cache (``fp16``: half the memory)."""
    compile: bool = False
    """``torch.compile`` the encoder (off by default: see docs/benchmarks.md)."""

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    def computes_semantic_scores(self) -> bool:
        """Whether evaluations compute cosine / R@1 / R@5: a text encoder is given, or loaded as distillation teacher."""
        return bool(self.text_encoder) or self.distill_weight > 0

    def reporters(self) -> list[str]:
        """``report_to`` as a list of known names."""
        return [r.strip() for r in self.report_to.split(",") if r.strip()]

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the flag for any setting that cannot work.

        Everything is checked before anything is read, loaded or deleted.
        """
        need = ["encoder_checkpoint", "val_features", "val_manifest"]
        if not self.eval_only:
            need += ["train_features", "train_manifest"]
        missing = [f"--{n}" for n in need if not getattr(self, n)]
        if missing:
            raise ConfigError(f"missing required flag(s): {', '.join(missing)}")
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            value = getattr(self, f.name)
            allowed = _literal_values(hints[f.name])
            if allowed and value not in allowed:
                raise ConfigError(f"--{f.name} must be one of {', '.join(allowed)} (got {value!r})")
            if isinstance(value, float) and not math.isfinite(value):
                raise ConfigError(f"--{f.name} must be a finite number (got {value})")
        for name, (low, high, low_open, high_open) in _RANGES.items():
            value = getattr(self, name)
            if value is None:
                continue
            too_low = value <= low if low_open else value < low
            too_high = high is not None and (value >= high if high_open else value > high)
            if too_low or too_high:
                lo = ("(" if low_open else "[") + f"{low:g}"
                hi = (f"{high:g}" + (")" if high_open else "]")) if high is not None else "inf)"
                raise ConfigError(f"--{name} must be in {lo}, {hi} (got {value:g})" + _RANGE_HINTS.get(name, ""))
        if self.precision == "fp16":  # pragma: no cover - refused by the Literal above; kept for the message
            raise ConfigError("--precision fp16 is unstable for T5; use bf16 or fp32")
        if not self.freeze_decoder:
            raise ConfigError("the SONAR text decoder is always frozen in sonar-ft; drop --freeze_decoder false")
        unknown = [r for r in self.reporters() if r not in REPORTERS]
        if unknown:
            raise ConfigError(f"--report_to: unknown {', '.join(unknown)}; use a comma-separated list of {', '.join(REPORTERS)}")
        if not self.eval_only and self.select_metric in SEMANTIC_METRICS and not self.computes_semantic_scores():
            raise ConfigError(
                f"--select_metric {self.select_metric} is a semantic score, computed only with a SONAR text encoder: "
                "give --text_encoder text_sonar_basic_encoder (or distil with --distill_weight > 0), or select another metric"
            )
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ConfigError(f"--device {self.device!r} is not a device; use auto, cpu, cuda or cuda:N")
        self._validate_lora()

    def _validate_lora(self) -> None:
        if self.lora_rank == 0:
            return
        if self.lora_alpha <= 0:
            raise ConfigError(f"--lora_alpha must be positive (got {self.lora_alpha}); 2 x --lora_rank is usual")
        if not 0 <= self.lora_dropout < 1:
            raise ConfigError(f"--lora_dropout must be in [0, 1) (got {self.lora_dropout})")
        if not parse_names(self.lora_targets):
            raise ConfigError(f"--lora_targets is empty; use e.g. {TrainConfig.lora_targets}")
        if self.freeze_encoder_layers:
            raise ConfigError("--freeze_encoder_layers has no use with --lora_rank > 0 (the base weights are frozen anyway); drop one")
        if self.compile:
            raise ConfigError("--compile is not supported together with --lora_rank > 0; drop --compile")


def parse_names(text: str) -> list[str]:
    """The names of a comma-separated flag value (``--lora_targets`` / ``--lora_trainable``)."""
    return [n.strip() for n in text.split(",") if n.strip()]


# name: (low, high, low bound excluded, high bound excluded); None = unbounded above.
_RANGES: dict[str, tuple[float, float | None, bool, bool]] = {
    "batch_size": (1, None, False, False), "epochs": (1, None, False, False), "grad_accum": (1, None, False, False),
    "eval_every": (1, None, False, False), "beam_size": (1, None, False, False), "max_gen_len": (1, None, False, False),
    "max_samples": (1, None, False, False), "max_frames": (1, None, False, False), "loss_chunk_size": (1, None, False, False),
    "subset_fraction": (0, 1, True, False), "learning_rate": (0, None, True, False), "weight_decay": (0, None, False, False),
    "label_smoothing": (0, 1, False, True), "dropout": (0, 1, False, True), "plateau_factor": (0, 1, True, True),
    "grad_clip": (0, None, False, False), "warmup_steps": (0, None, False, False), "plateau_patience": (0, None, False, False),
    "early_stopping_patience": (0, None, False, False), "distill_weight": (0, None, False, False),
    "num_workers": (0, None, False, False), "checkpoint_every_steps": (0, None, False, False), "checkpoint_every_minutes": (0, None, False, False),
    "freeze_encoder_layers": (0, None, False, False), "log_every_steps": (0, None, False, False),
    "progress_seconds": (0, None, False, False), "lora_rank": (0, None, False, False), "state_slots": (0, 2, False, False),
}
_RANGE_HINTS = {
    "max_samples": "; leave it out to use all clips",
    "checkpoint_every_steps": "; 0 saves at epoch ends only",
    "checkpoint_every_minutes": "; 0 turns time-based saves off",
    "early_stopping_patience": "; 0 turns early stopping off",
    "grad_clip": "; 0 turns clipping off",
    "lora_rank": "; 0 fine-tunes every weight",
}


def _literal_values(hint: Any) -> tuple[Any, ...]:
    return typing.get_args(hint) if typing.get_origin(hint) is Literal else ()


def _options(hint: Any) -> tuple[Any, ...]:
    """The non-None members of ``X | None`` (or ``(X,)``)."""
    options = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    return tuple(o for o in options if o is not type(None))


# ------------------------------------------------------------------------------------------------
# Field docs and sections, read from this file's source (the docstring under each field)
# ------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def field_docs(cls: type = TrainConfig) -> dict[str, tuple[str, str]]:
    """``{field: (section, doc)}`` from the class source: the string under each field, the ``# -- x --`` above."""
    source = inspect.getsource(cls)
    lines = source.splitlines()
    body = ast.parse(source).body[0].body  # type: ignore[attr-defined]
    docs: dict[str, tuple[str, str]] = {}
    for node, after in zip(body, body[1:] + [None]):
        if not isinstance(node, ast.AnnAssign) or not isinstance(node.target, ast.Name):
            continue
        doc = ""
        if isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str):
            doc = " ".join(after.value.value.split())
        section = "settings"
        for line in reversed(lines[: node.lineno - 1]):
            match = re.match(r"\s*# -- ([^-]+?) -", line)
            if match:
                section = match.group(1).strip()
                break
        docs[node.target.id] = (section, doc)
    return docs


def add_arguments(parser: argparse.ArgumentParser, *, skip: tuple[str, ...] = (), title: str = "",
                  cls: type = TrainConfig) -> dict[str, argparse._ArgumentGroup]:
    """Every field of the dataclass ``cls`` (:class:`TrainConfig`) as ``--name VALUE`` (grouped by section, help from
    its doc); returns the argument groups by title.

    Values stay strings here; :func:`make_config` (:func:`coerce`) types them (one coercion for flags and files).
    Booleans take ``--flag`` alone for true, or ``--flag true/false``. Nothing has an argparse
    default (the parser must use ``argument_default=SUPPRESS``) so that only typed flags override
    a ``--config`` file.
    """
    hints = typing.get_type_hints(cls)
    defaults = {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
                for f in fields(cls) if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING}
    groups: dict[str, Any] = {}
    for name, (section, doc) in field_docs(cls).items():
        if name in skip:
            continue
        key = f"{title} ({section})" if title else section
        group = groups.setdefault(key, parser.add_argument_group(key))
        default = defaults.get(name)
        help_text = doc.replace("%", "%%") + (f" (default {default})" if default not in (None, "") else "")
        options = _options(hints[name])
        allowed = _literal_values(options[0]) if len(options) == 1 else ()
        if options == (bool,):
            group.add_argument(f"--{name}", nargs="?", const="true", metavar="BOOL", help=help_text)
        elif allowed:
            group.add_argument(f"--{name}", choices=allowed, help=help_text)
        else:
            kind = getattr(options[0], "__name__", "value")
            group.add_argument(f"--{name}", metavar=kind.upper(), help=help_text)
    return groups


def command_line(settings: Mapping[str, Any]) -> list[str]:
    """The recipe's flags for ``settings`` (``TrainConfig`` field names -> values), as :func:`add_arguments` reads them back.

    The one place a command line of the recipe is written (notebooks, the demo, tests): ``None`` is left
    out, ``True`` is the bare flag, ``False`` is ``--flag false``. An unknown name is a ``ConfigError``.
    """
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    out: list[str] = []
    for name, value in settings.items():
        if name not in fields:
            raise ConfigError(f"{name!r} is not a setting of the recipe; see `python train_sonar_finetuning.py --help`")
        if value is None:
            continue
        if value is True:
            out.append(f"--{name}")
        else:
            out += [f"--{name}", "false" if value is False else str(value)]
    return out


# ------------------------------------------------------------------------------------------------
# Values from YAML files and flags
# ------------------------------------------------------------------------------------------------
def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from ``path`` (comments allowed), with clear errors."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"--config {path} is not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path} must hold a mapping of flag: value")
    return data


def coerce(name: str, value: Any, annotation: Any, source: str) -> Any:
    """``value`` (from a flag, a YAML file or code) as the field's type, or a :class:`ConfigError` naming it."""
    if value is None:
        return None
    options = _options(annotation)
    for kind in options:
        allowed = _literal_values(kind)
        if allowed:
            if value in allowed or isinstance(value, str):
                return value  # a string outside the allowed values is refused by validate(), naming --flag
            continue
        if kind is bool:
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no", "on", "off"):
                return value.lower() in ("true", "1", "yes", "on")
        elif kind is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
            if isinstance(value, float) and value.is_integer():
                return int(value)
            if isinstance(value, str):
                try:
                    return int(value)
                except ValueError:
                    pass
        elif kind is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
            if isinstance(value, str):
                try:
                    return float(value)
                except ValueError:
                    pass
        elif kind is str:
            if isinstance(value, (str, Path)):
                return str(value)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return str(value)
    wanted = " or ".join(
        ", ".join(map(str, _literal_values(o))) if _literal_values(o) else getattr(o, "__name__", str(o)) for o in options
    )
    raise ConfigError(f"{source}: {name} must be {wanted}, got {value!r}")


_coerce = coerce  # the name older callers used


def make_config(values: Mapping[str, Any], *, source: str = "settings", base: TrainConfig | None = None) -> TrainConfig:
    """``base`` (default: the defaults) updated with ``values``, type-checked."""
    known = typing.get_type_hints(TrainConfig)
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise ConfigError(f"{source}: unknown setting(s) {', '.join(unknown)}. Known: {', '.join(sorted(known))}")
    coerced = {k: coerce(k, v, known[k], source) for k, v in values.items()}
    return dataclasses.replace(base or TrainConfig(), **coerced)


def config_from_sources(cli: Mapping[str, Any], config_file: str | Path | None = None) -> TrainConfig:
    """Defaults < ``config_file`` < ``cli`` (only the flags the user actually gave)."""
    cfg = TrainConfig()
    if config_file:
        cfg = make_config(read_yaml(config_file), source=f"--config {config_file}", base=cfg)
    return make_config(cli, source="command line", base=cfg)
