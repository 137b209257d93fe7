#!/usr/bin/env python
"""Fine-tune the SONAR ASL encoder on How2Sign against the frozen SONAR text decoder.

The recipe: parse flags (and ``--config run.yaml``) → one ``TrainConfig`` → ``sonar_ft.train.train``
(or ``evaluate_checkpoint`` with ``--eval_only``) → a summary. Everything the run used is written to
``--output_dir/config.json``.

Quick test (the Colab seed's command, unchanged)::

    python train_sonar_finetuning.py --encoder_checkpoint sonar_checkpoints/dm_70h_ub_sonar_encoder.pth \\
        --train_features features/train --train_manifest manifests/train.tsv \\
        --val_features features/val --val_manifest manifests/val.tsv \\
        --output_dir runs/quick_test --batch_size 8 --epochs 5 --learning_rate 1e-4 \\
        --freeze_decoder --eval_every 1 --device cuda --max_samples 50

Several GPUs (data-parallel; ``--batch_size`` is per process)::

    torchrun --nproc_per_node=4 train_sonar_finetuning.py ... --batch_size 8
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from sonar_ft.cli import run, setup_logging
from sonar_ft.config import config_from_sources
from sonar_ft.distributed import is_main_process, world_size_from_env
from sonar_ft.errors import ConfigError
from sonar_ft.train import BEST_ENCODER, TEST_RESULTS, evaluate_checkpoint, train


def build_parser() -> argparse.ArgumentParser:
    # argument_default=SUPPRESS: only flags the user typed reach the config, so --config values
    # are not overwritten by parser defaults. The defaults live in TrainConfig.
    p = argparse.ArgumentParser(
        description="Fine-tune the SONAR ASL encoder (see README.md).",
        argument_default=argparse.SUPPRESS,
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--config", help="YAML file of settings (flag names as keys); command-line flags win")

    data = p.add_argument_group("data")
    data.add_argument("--train_features", help="folder of training feature files (.npy / .pt)")
    data.add_argument("--train_manifest", help="training manifest (.tsv, or How2Sign .csv)")
    data.add_argument("--val_features", help="folder of validation (or test, with --eval_only) features")
    data.add_argument("--val_manifest", help="validation (or test) manifest")
    data.add_argument("--max_samples", type=int, help="use at most N clips per split (quick test)")
    data.add_argument("--subset_fraction", type=float, help="use this seeded fraction of the training clips")
    data.add_argument("--max_frames", type=int, help="truncate clips longer than this")
    data.add_argument("--on_bad_sample", choices=["error", "skip"],
                      help="unusable clips (missing, unreadable, NaN/Inf, empty...): stop listing them all, or train "
                      "without them; both write bad_samples.tsv (default error)")
    data.add_argument("--num_workers", type=int, help="data-loading worker processes (default 0)")

    models = p.add_argument_group("models")
    models.add_argument("--encoder_checkpoint", help="SONAR ASL encoder checkpoint to start from (or evaluate)")
    models.add_argument("--decoder", help="frozen SONAR text decoder: asset card name, card .yaml or checkpoint (default text_sonar_basic_decoder)")
    models.add_argument("--tokenizer", help="tokenizer: card name, card .yaml or SentencePiece .model (default: the decoder's)")
    models.add_argument("--text_encoder", help="SONAR text encoder for --distill_weight (default text_sonar_basic_encoder)")
    models.add_argument("--tgt_lang", help="FLORES-200 target language (default eng_Latn)")
    models.add_argument("--freeze_decoder", action="store_true", help="accepted for compatibility: the decoder is always frozen")
    models.add_argument("--dropout", type=float, help="encoder dropout (default: the checkpoint architecture's 0.1)")

    opt = p.add_argument_group("optimisation")
    opt.add_argument("--batch_size", type=int, help="clips per batch (default 8)")
    opt.add_argument("--epochs", type=int, help="number of epochs (default 10)")
    opt.add_argument("--learning_rate", type=float, help="AdamW learning rate (default 1e-4)")
    opt.add_argument("--weight_decay", type=float, help="AdamW weight decay (default 0.01)")
    opt.add_argument("--label_smoothing", type=float, help="label smoothing of the token loss (default 0.1)")
    opt.add_argument("--grad_clip", type=float, help="max gradient norm, 0 = off (default 1.0)")
    opt.add_argument("--grad_accum", type=int, help="batches per optimiser step (default 1)")
    opt.add_argument("--warmup_steps", type=int, help="linear warm-up steps (default 0)")
    opt.add_argument("--plateau_factor", type=float, help="LR factor when the val metric stalls (default 0.5)")
    opt.add_argument("--plateau_patience", type=int, help="evaluations without improvement before reducing LR (default 2)")
    opt.add_argument("--early_stopping_patience", type=int, help="stop after N evaluations without improvement, 0 = off")
    opt.add_argument("--distill_weight", type=float, help="weight of the text-embedding distillation term (default 0)")
    opt.add_argument("--distill_loss", choices=["mse", "cosine"], help="distillation distance (default mse)")
    opt.add_argument("--seed", type=int, help="random seed (default 42)")

    ev = p.add_argument_group("evaluation")
    ev.add_argument("--eval_every", type=int, help="evaluate every N epochs (default 1)")
    ev.add_argument("--beam_size", type=int, help="beam size (default 5)")
    ev.add_argument("--max_gen_len", type=int, help="maximum generated tokens (default 128)")
    ev.add_argument("--select_metric", choices=["bleu", "loss"], help="metric for best checkpoint / plateau (default bleu)")
    ev.add_argument("--eval_only", action="store_true", help=f"evaluate --encoder_checkpoint on --val_*; write only {TEST_RESULTS}")

    system = p.add_argument_group("system")
    system.add_argument("--output_dir", help="where metrics, predictions and checkpoints go (default runs/finetune)")
    system.add_argument("--device", help="auto, cpu, cuda or cuda:N (default auto)")
    system.add_argument("--precision", choices=["auto", "bf16", "fp32"], help="auto = bf16 where supported, else fp32")
    system.add_argument("--resume", action="store_true", help="continue the run in --output_dir from last.pt")
    system.add_argument("--overwrite", action="store_true", help="replace another run's files in --output_dir")
    system.add_argument("--checkpoint_every_steps", type=int,
                        help="also save the resumable last.pt every N optimiser steps inside an epoch (default 0: epoch ends only)")
    system.add_argument("--loss_chunk_size", type=int, help="target positions per chunk of vocabulary logits (default 256)")

    mem = p.add_argument_group("memory and speed (`sonar-ft plan --gpu t4` recommends these)")
    mem.add_argument("--gradient_checkpointing", action="store_true",
                     help="recompute encoder blocks and frozen-decoder layers in backward instead of storing activations")
    mem.add_argument("--decoder_dtype", choices=["fp32", "bf16", "fp16"],
                     help="frozen decoder weights; fp16 only on GPUs without bf16, e.g. T4 (default fp32)")
    mem.add_argument("--freeze_encoder_layers", type=int, help="freeze the feature projection and the lowest N encoder blocks (default 0)")
    mem.add_argument("--optimizer", choices=["adamw", "adamw8bit"], help="adamw8bit = bitsandbytes 8-bit AdamW, CUDA only (default adamw)")
    mem.add_argument("--cache_features", action="store_true", help="keep clips in memory after their first read (later epochs skip the disk)")
    mem.add_argument("--cache_dtype", choices=["fp32", "fp16"], help="dtype of the feature cache (default fp32)")
    mem.add_argument("--compile", action="store_true", help="torch.compile the encoder (default off)")

    lora = p.add_argument_group("LoRA (parameter-efficient fine-tuning, sonar_ft.lora)")
    lora.add_argument("--lora_rank", type=int, help="rank of the low-rank adapters; 0 = full fine-tuning (default 0)")
    lora.add_argument("--lora_alpha", type=float, help="adapter scale numerator: update = B A x alpha / rank (default 32)")
    lora.add_argument("--lora_dropout", type=float, help="dropout on the adapters' input (default 0)")
    lora.add_argument("--lora_targets", help="comma-separated Linear names that get adapters (default q,k,v,o,wi_0,wi_1,wi,wo)")
    lora.add_argument("--lora_trainable", help="comma-separated small modules trained in full (default "
                      "feature_projection,final_layer_norm,projection_out; '' for none)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    setup_logging(sys.stdout)
    args = vars(build_parser().parse_args(argv))
    config_file = args.pop("config", None)
    return run(lambda _: _main(args, config_file), argparse.Namespace())


def _main(flags: dict, config_file: str | None) -> int:
    cfg = config_from_sources(flags, config_file)

    if cfg.eval_only:
        if world_size_from_env() > 1:
            raise ConfigError("--eval_only runs as one process: start it with python, not torchrun")
        record = evaluate_checkpoint(cfg)
        print(
            f"\n{record['num_samples']} clips | BLEU {record['bleu']:.2f} | chrF {record['chrf']:.2f} | "
            f"loss {record['loss']:.4f}\n{record['bleu_signature']}\nwritten: {cfg.output_dir}/{TEST_RESULTS}"
        )
        return 0

    result = train(cfg)
    if not is_main_process():
        return 0  # under torchrun, rank 0 prints the summary
    print("\n" + "=" * 72)
    if result.best_epoch is None:
        print("finished without an evaluation")
    else:
        print(
            f"best epoch {result.best_epoch}: val BLEU {result.best_val_bleu:.2f}, val loss {result.best_val_loss:.4f}"
            + (" (stopped early)" if result.stopped_early else "")
        )
        print(f"best encoder: {result.output_dir}/{BEST_ENCODER}")
    print(f"outputs: {result.output_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
