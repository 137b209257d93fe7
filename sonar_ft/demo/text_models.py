"""The demo's "pretrained SONAR": a small SONAR-architecture text autoencoder trained on the corpus.

Real SONAR is a text encoder and decoder trained so that the decoder turns a sentence embedding back
into the sentence, in any of 200 languages. The demo builds the same thing in miniature, with the
real sonar-space factories (``SonarTextEncoderFactory`` / ``SonarTextDecoderFactory``), a word-level
SentencePiece tokenizer loaded by fairseq2's NLLB tokenizer, and fairseq2 asset cards, so the
recipe loads the demo decoder through exactly the code path it uses for the real one.

Training is deterministic (fixed seed, fixed step count). Sentences are embedded from English or
French and decoded into English or French, so the embedding space is shared by both languages.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import yaml
from tqdm.auto import tqdm

from sonar_ft.demo.corpus import DemoSentence
from sonar_ft.files.atomic import atomic_path, save_torch, write_text

log = logging.getLogger(__name__)

DEMO_LANGS = ("eng_Latn", "fra_Latn")


@dataclass(frozen=True)
class TextModelConfig:
    """Sizes and training schedule of the demo text autoencoder."""

    model_dim: int = 64
    """Width of encoder and decoder; also the sentence-embedding size."""
    num_layers: int = 2
    num_heads: int = 4
    ffn_dim: int = 128
    max_seq_len: int = 32
    steps: int = 800
    batch_size: int = 64
    learning_rate: float = 3e-3
    embedding_noise: float = 0.1
    """Gaussian noise added to embeddings in training, so the decoder tolerates imperfect ones."""
    seed: int = 0


def train_tokenizer(sentences: list[DemoSentence], out: Path) -> Path:
    """Train a word-level SentencePiece model (SONAR token ids: pad 0, unk 1, bos 2, eos 3)."""
    import sentencepiece as spm

    text = "\n".join(s for sent in sentences for s in (sent.en, sent.fr))
    with atomic_path(out) as tmp:
        prefix = tmp.with_suffix("")
        corpus = tmp.with_suffix(".txt")
        corpus.write_text(text, encoding="utf-8")
        try:
            spm.SentencePieceTrainer.train(
                input=str(corpus),
                model_prefix=str(prefix),
                model_type="word",
                vocab_size=1000,
                hard_vocab_limit=False,  # the corpus has fewer words than 1000
                normalization_rule_name="identity",  # keeps the model ~1 KB instead of ~240 KB
                unk_id=0,  # fairseq2 inserts <pad> at 0, shifting these to unk 1, bos 2, eos 3
                bos_id=1,
                eos_id=2,
                pad_id=-1,
                minloglevel=2,
            )
            Path(str(prefix) + ".model").replace(tmp)
        finally:
            corpus.unlink(missing_ok=True)
            Path(str(prefix) + ".vocab").unlink(missing_ok=True)
    return out


def _vocab_yaml(size: int) -> dict[str, int]:
    return {"size": size, "unk_idx": 1, "bos_idx": 2, "eos_idx": 3, "pad_idx": 0}


def _tokenizer_fields(tokenizer_file: str) -> dict[str, Any]:
    return {
        "tokenizer": tokenizer_file,
        "tokenizer_family": "nllb",
        "tokenizer_config": {"_set_": {"default_lang": "eng_Latn", "langs": list(DEMO_LANGS)}},
    }


def _shared_model_config(cfg: TextModelConfig, vocab_size: int) -> dict[str, Any]:
    return {
        "model_dim": cfg.model_dim,
        "max_seq_len": cfg.max_seq_len,
        "vocab_info": _vocab_yaml(vocab_size),
        "num_encoder_layers": cfg.num_layers,
        "num_decoder_layers": cfg.num_layers,
        "num_encoder_attn_heads": cfg.num_heads,
        "num_decoder_attn_heads": cfg.num_heads,
        "ffn_inner_dim": cfg.ffn_dim,
    }


def decoder_card(name: str, checkpoint: str, tokenizer: str, vocab_size: int, cfg: TextModelConfig) -> dict[str, Any]:
    """An asset card for the demo decoder, in sonar-space's card format."""
    return {
        "name": name,
        "model_family": "transformer_decoder",
        "model_arch": "toy",
        "model_config": {"_set_": _shared_model_config(cfg, vocab_size)},
        "checkpoint": checkpoint,
        **_tokenizer_fields(tokenizer),
    }


def encoder_card(name: str, checkpoint: str, tokenizer: str, vocab_size: int, cfg: TextModelConfig) -> dict[str, Any]:
    """An asset card for the demo text encoder (used for the optional distillation term)."""
    return {
        "name": name,
        "model_family": "transformer_encoder",
        "model_arch": "basic",
        "model_config": {"_set_": {**_shared_model_config(cfg, vocab_size), "_from_fairseq": False, "pooling": "mean"}},
        "checkpoint": checkpoint,
        **_tokenizer_fields(tokenizer),
    }


def _configs(cfg: TextModelConfig, vocab_size: int) -> tuple[Any, Any]:
    from fairseq2.data.tokenizers import VocabularyInfo
    from sonar.models.sonar_text import SonarTextDecoderConfig, SonarTextEncoderConfig

    vocab = VocabularyInfo(size=vocab_size, unk_idx=1, bos_idx=2, eos_idx=3, pad_idx=0)
    common = dict(
        model_dim=cfg.model_dim,
        max_seq_len=cfg.max_seq_len,
        vocab_info=vocab,
        num_encoder_layers=cfg.num_layers,
        num_decoder_layers=cfg.num_layers,
        num_encoder_attn_heads=cfg.num_heads,
        num_decoder_attn_heads=cfg.num_heads,
        ffn_inner_dim=cfg.ffn_dim,
        learned_pos=False,
        no_scale_embedding=False,
        emb_dropout_p=0.1,
        attention_dropout_p=0.1,
        activation_dropout_p=0.1,
        no_token_positional_embeddings=False,
        activation_fn="ReLU",
    )
    enc = SonarTextEncoderConfig(**common, pooling="mean", normalize_before=False, _from_fairseq=False)
    dec = SonarTextDecoderConfig(**common, normalize_before=True)
    return enc, dec


def _pad(seqs: list[torch.Tensor]) -> tuple[torch.Tensor, list[int]]:
    lens = [len(s) for s in seqs]
    out = torch.zeros(len(seqs), max(lens), dtype=torch.long)  # pad index 0
    for i, s in enumerate(seqs):
        out[i, : len(s)] = s
    return out, lens


def pretrain_autoencoder(
    sentences: list[DemoSentence], tokenizer_path: Path, out_dir: Path, cfg: TextModelConfig = TextModelConfig()
) -> dict[str, Path]:
    """Train the text encoder + decoder on the corpus and write checkpoints and asset cards.

    Returns the paths of ``text_decoder.yaml`` (card) and ``text_encoder.yaml`` (card).
    """
    from fairseq2.models.nllb.tokenizer import NllbTokenizerConfig, load_nllb_tokenizer
    from fairseq2.nn import BatchLayout
    from sonar.models.sonar_text import SonarTextDecoderFactory, SonarTextEncoderFactory

    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    tokenizer = load_nllb_tokenizer(tokenizer_path, NllbTokenizerConfig(langs=list(DEMO_LANGS), default_lang="eng_Latn"))
    vocab_size = tokenizer.vocab_info.size
    enc_cfg, dec_cfg = _configs(cfg, vocab_size)
    encoder = SonarTextEncoderFactory(enc_cfg).create_model()
    decoder = SonarTextDecoderFactory(dec_cfg).create_model()
    params = list(encoder.parameters()) + list(decoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=cfg.learning_rate, total_steps=cfg.steps, pct_start=0.1)

    src_enc = {lang: tokenizer.create_encoder(lang=lang, mode="source") for lang in DEMO_LANGS}
    tgt_enc = {lang: tokenizer.create_encoder(lang=lang, mode="target") for lang in DEMO_LANGS}

    def text_of(sent: DemoSentence, lang: str) -> str:
        return sent.en if lang == "eng_Latn" else sent.fr

    encoder.train()
    decoder.train()
    bar = tqdm(range(cfg.steps), desc="pretraining demo text autoencoder", leave=False, disable=None)  # a bar only in a terminal
    for _ in bar:
        batch = rng.sample(sentences, cfg.batch_size)
        src_langs = [rng.choice(DEMO_LANGS) for _ in batch]
        tgt_langs = [rng.choice(DEMO_LANGS) for _ in batch]
        src, src_lens = _pad([src_enc[lang](text_of(s, lang)) for s, lang in zip(batch, src_langs)])
        tgt, tgt_lens = _pad([tgt_enc[lang](text_of(s, lang)) for s, lang in zip(batch, tgt_langs)])
        emb = encoder(src, BatchLayout.of(src, src_lens)).sentence_embeddings  # (B, E)
        emb = emb + cfg.embedding_noise * torch.randn_like(emb)
        memory = emb.unsqueeze(1)
        inputs = tgt[:, :-1]
        states = decoder.decode(inputs, BatchLayout.of(inputs, [n - 1 for n in tgt_lens]), memory, BatchLayout.of(memory))
        logits = decoder.project(states[:, 1:])  # skip the position that predicts the forced language token
        targets = tgt[:, 2:]
        keep = torch.arange(targets.size(1))[None, :] < (torch.tensor(tgt_lens) - 2)[:, None]
        loss = F.cross_entropy(logits[keep], targets[keep])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    log.info("demo text autoencoder: final training loss %.4f", loss.item())

    out_dir.mkdir(parents=True, exist_ok=True)
    save_torch(out_dir / "text_decoder.pt", {"model": decoder.state_dict()})
    save_torch(out_dir / "text_encoder.pt", {"model": encoder.state_dict()})
    tok_name = tokenizer_path.name
    cards = {
        "decoder": out_dir / "text_decoder.yaml",
        "encoder": out_dir / "text_encoder.yaml",
    }
    write_text(cards["decoder"], yaml.safe_dump(decoder_card("demo_text_decoder", "text_decoder.pt", tok_name, vocab_size, cfg), sort_keys=False))
    write_text(cards["encoder"], yaml.safe_dump(encoder_card("demo_text_encoder", "text_encoder.pt", tok_name, vocab_size, cfg), sort_keys=False))
    return cards
