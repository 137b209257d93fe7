"""The frozen SONAR text decoder: real sonar-space model loaded through fairseq2 from a local card."""

from __future__ import annotations

import pytest
import torch

from sonar_ft.models.decoder import FrozenTextDecoder, chunked_cross_entropy
from sonar_ft.models.encoder import load_encoder
from sonar_ft.errors import ConfigError


@pytest.fixture(scope="module")
def decoder(tiny_demo) -> FrozenTextDecoder:
    return FrozenTextDecoder.load(tiny_demo.decoder_card)


TEXTS = ["The cat eats the apple.", "My mother sees a red book at home.", "The dog likes the ball."]


def test_loads_real_sonar_decoder_frozen_in_eval_mode(decoder):
    from sonar.nn.conditional_decoder_model import ConditionalTransformerDecoderModel

    assert isinstance(decoder.model, ConditionalTransformerDecoderModel)
    assert not decoder.training and not decoder.model.training
    assert all(not p.requires_grad for p in decoder.model.parameters())
    decoder.train()  # a frozen decoder stays in eval mode even when asked to train
    assert not decoder.model.training


def test_gradient_reaches_embedding_but_not_decoder(decoder):
    emb = torch.randn(3, decoder.embedding_dim, requires_grad=True)
    decoder.loss(emb, TEXTS).loss.backward()
    assert emb.grad is not None and emb.grad.abs().sum() > 0
    assert all(p.grad is None for p in decoder.model.parameters())


def test_padding_is_ignored(decoder):
    emb = torch.randn(3, decoder.embedding_dim)
    batch = decoder.loss(emb, TEXTS)
    singles = [decoder.loss(emb[i : i + 1], [t]) for i, t in enumerate(TEXTS)]
    expected = sum(float(s.loss) * s.num_tokens for s in singles) / sum(s.num_tokens for s in singles)
    assert batch.num_tokens == sum(s.num_tokens for s in singles)
    assert float(batch.loss) == pytest.approx(expected, rel=1e-5)


def test_loss_scores_words_and_eos_not_the_forced_language_token(decoder):
    enc = decoder.tokenizer.create_encoder(task="translation", lang="eng_Latn", mode="target")
    n = len(enc(TEXTS[0]))  # </s> __eng_Latn__ words... </s>
    out = decoder.loss(torch.randn(1, decoder.embedding_dim), TEXTS[:1])
    assert out.num_tokens == n - 2


def test_label_smoothing_matches_torch_definition(decoder):
    emb = torch.randn(2, decoder.embedding_dim)
    plain = decoder.loss(emb, TEXTS[:2])
    smooth = decoder.loss(emb, TEXTS[:2], label_smoothing=0.2)
    tokens, lens = decoder.tokenize(TEXTS[:2], "eng_Latn")
    states = decoder.decoder_states(emb, tokens, lens)[:, 1:]
    targets = tokens[:, 2:]
    keep = torch.arange(targets.size(1))[None] < (lens - 2)[:, None]
    logits = decoder.model.project(states)[keep]
    ref = torch.nn.functional.cross_entropy(logits, targets[keep], label_smoothing=0.2)
    assert float(smooth.loss) == pytest.approx(float(ref), rel=1e-5)
    assert float(smooth.loss) != pytest.approx(float(plain.loss), rel=1e-3)


@pytest.mark.parametrize("chunk", [1, 3, 7])
def test_chunked_loss_equals_full_logits(chunk):
    torch.manual_seed(0)
    hidden = torch.randn(10, 8, requires_grad=True)
    weight = torch.randn(50, 8)
    targets = torch.randint(0, 50, (10,))
    full = torch.nn.functional.cross_entropy(hidden @ weight.T, targets, reduction="sum", label_smoothing=0.1)
    (g_full,) = torch.autograd.grad(full, hidden)
    part = chunked_cross_entropy(hidden, weight, None, targets, label_smoothing=0.1, chunk_size=chunk)
    (g_part,) = torch.autograd.grad(part, hidden)
    assert float(part) == pytest.approx(float(full), rel=1e-5)
    torch.testing.assert_close(g_part, g_full, rtol=1e-5, atol=1e-6)


def test_unknown_target_language_is_a_clear_error(decoder):
    with pytest.raises(ConfigError, match="english.*FLORES-200"):
        decoder.loss(torch.randn(1, decoder.embedding_dim), TEXTS[:1], "english")
    with pytest.raises(ConfigError, match="deu_Latn"):
        decoder.generate(torch.randn(1, decoder.embedding_dim), "deu_Latn")


def test_generation_runs_batched_in_each_language(decoder):
    emb = torch.randn(5, decoder.embedding_dim)
    for lang in ("eng_Latn", "fra_Latn"):
        texts = decoder.generate(emb, lang, beam_size=2, max_gen_len=12, batch_size=3)
        assert len(texts) == 5 and all(isinstance(t, str) for t in texts)


def test_decoder_reproduces_sentences_from_text_embeddings(tiny_demo, decoder):
    # The demo decoder was pretrained as an autoencoder: the text encoder's embedding of a sentence
    # must decode back to that sentence, in English and in French.
    from sonar_ft.models.text_encoder import FrozenTextEncoder

    teacher = FrozenTextEncoder.load(tiny_demo.text_encoder_card)
    refs = tiny_demo.split_manifest("test").read_text(encoding="utf-8").splitlines()[1:6]
    refs = [line.split("\t")[-1] for line in refs]
    hyps = decoder.generate(teacher.embed(refs), "eng_Latn", beam_size=2)
    assert sum(h == r for h, r in zip(hyps, refs)) >= 4


def test_training_step_updates_encoder_never_decoder(tiny_demo, decoder):
    encoder, _ = load_encoder(tiny_demo.encoder_checkpoint)
    encoder.train()
    before_dec = {k: v.clone() for k, v in decoder.model.state_dict().items()}
    before_enc = {k: v.clone() for k, v in encoder.state_dict().items()}
    opt = torch.optim.AdamW([p for p in encoder.parameters() if p.requires_grad], lr=1e-2)
    feats = torch.randn(2, 9, encoder.config.feature_dim)
    mask = torch.ones(2, 9, dtype=torch.bool)
    decoder.loss(encoder(feats, mask), TEXTS[:2]).loss.backward()
    opt.step()
    assert all(torch.equal(v, decoder.model.state_dict()[k]) for k, v in before_dec.items())
    changed = [k for k, v in before_enc.items() if not torch.equal(v, encoder.state_dict()[k])]
    assert "projection_out.weight" in changed and any(k.startswith("encoder.block.0") for k in changed)


def test_tokenizer_that_does_not_match_the_decoder_is_refused(tiny_demo):
    # A bare SentencePiece file gets the 200+ FLORES language tokens: a different vocabulary.
    with pytest.raises(ConfigError, match="do not belong together"):
        FrozenTextDecoder.load(tiny_demo.decoder_card, tokenizer=tiny_demo.assets / "tokenizer.model")


def test_missing_card_file_names_it(tmp_path):
    with pytest.raises(ConfigError, match="nope.yaml"):
        FrozenTextDecoder.load(tmp_path / "nope.yaml")
