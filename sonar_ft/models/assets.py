"""Resolve SONAR text models and tokenizers through fairseq2's real asset loader.

A model or tokenizer can be named three ways, and all three go through ``fairseq2.models.load_model``
/ ``fairseq2.data.tokenizers.load_tokenizer`` with an asset card:

- an asset card name known to fairseq2 / sonar-space (``text_sonar_basic_decoder``): downloaded
  and cached by fairseq2 on first use;
- a local asset card ``.yaml`` (the same fields as sonar-space's cards; relative ``checkpoint`` /
  ``tokenizer`` paths are resolved against the card's folder) — how the offline demo ships its models;
- a local checkpoint file (``.pt``) or SentencePiece model (``.model``): the official architecture of
  the given family is assumed (``basic``), for users who copied the official files to Drive.
"""

from __future__ import annotations

import logging
import socket
import urllib.error
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from sonar_ft.errors import ConfigError
from sonar_ft.stack_env import require_stack

log = logging.getLogger(__name__)

DECODER_FAMILY = "transformer_decoder"
ENCODER_FAMILY = "transformer_encoder"
DEFAULT_DECODER = "text_sonar_basic_decoder"
DEFAULT_TEXT_ENCODER = "text_sonar_basic_encoder"
# The SONAR tokenizer is the one published with the text encoder card (the decoder card names the same file).
DEFAULT_TOKENIZER = "text_sonar_basic_encoder"

_CARD_SUFFIXES = (".yaml", ".yml")
_TOKENIZER_SUFFIXES = (".model", ".spm")


def _file_uri(path: Path) -> str:
    return path.resolve().as_uri()


@lru_cache(maxsize=1)
def flores200_langs() -> tuple[str, ...]:
    """The target languages of the official SONAR tokenizer (read from sonar-space's card)."""
    import sonar

    card = Path(sonar.__file__).parent / "cards" / "text_sonar_basic_decoder.yaml"
    docs = [d for d in yaml.safe_load_all(card.read_text()) if d]
    for doc in docs:
        langs = doc.get("tokenizer_config", {}).get("_set_", {}).get("langs")
        if langs:
            return tuple(langs)
    raise RuntimeError(f"no language list in {card}")  # sonar-space changed its card format


def default_tokenizer_for(model: str | Path) -> str | Path:
    """The tokenizer to use with ``model`` when none is given.

    A local card names its own tokenizer; the official cards and bare checkpoint files use the SONAR
    tokenizer published with ``text_sonar_basic_encoder``.
    """
    if Path(str(model)).suffix in _CARD_SUFFIXES:
        return model
    if Path(str(model)).suffix in (".pt", ".pth") or str(model) in (DEFAULT_DECODER, DEFAULT_TEXT_ENCODER):
        return DEFAULT_TOKENIZER
    return model


def read_card_file(path: Path) -> dict[str, Any]:
    """Read a local asset card, resolving relative file paths against its folder."""
    try:
        docs = [d for d in yaml.safe_load_all(path.read_text(encoding="utf-8")) if d]
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read asset card {path}: {exc}") from None
    if len(docs) != 1 or not isinstance(docs[0], dict) or "name" not in docs[0]:
        raise ConfigError(f"asset card {path} must hold exactly one mapping with a 'name' field")
    meta = dict(docs[0])
    # fairseq2 reads the checkpoint with torch.load(weights_only=<restrict>); a card from a user
    # must not be able to switch that off and have a pickled checkpoint run code.
    meta["restrict"] = True
    for key in ("checkpoint", "tokenizer"):
        value = meta.get(key)
        if isinstance(value, str) and "://" not in value:
            local = Path(value)
            if not local.is_absolute():
                local = path.parent / local
            meta[key] = _file_uri(local)
    return meta


def resolve_card(spec: str | Path, *, family: str, kind: str) -> Any:
    """Turn a card name, card file or checkpoint path into something ``load_model`` accepts.

    ``kind`` is ``"model"`` or ``"tokenizer"`` and only changes how a bare file is wrapped.
    """
    require_stack()
    from fairseq2.assets import AssetCard

    text = str(spec)
    path = Path(text).expanduser()
    if path.suffix in _CARD_SUFFIXES:
        if not path.is_file():
            raise ConfigError(f"asset card not found: {path}")
        meta = read_card_file(path)
        return AssetCard(str(meta["name"]), meta)
    if path.exists() or "/" in text or path.suffix in (".pt", ".pth", *_TOKENIZER_SUFFIXES):
        if not path.is_file():
            raise ConfigError(f"{kind} file not found: {path}")
        if kind == "tokenizer":
            meta = {
                "name": path.stem,
                "tokenizer": _file_uri(path),
                "tokenizer_family": "nllb",
                "tokenizer_config": {"_set_": {"langs": list(flores200_langs()), "default_lang": "eng_Latn"}},
            }
        else:
            meta = {"name": path.stem, "model_family": family, "model_arch": "basic", "checkpoint": _file_uri(path),
                    "restrict": True}
        return AssetCard(path.stem, meta)
    return text  # a card name fairseq2 knows


def load_sonar_model(spec: str | Path, *, family: str, device: Any, dtype: Any) -> Any:
    """Load a SONAR text model (decoder or encoder) through fairseq2, with a clear error."""
    from fairseq2.models import load_model

    card = resolve_card(spec, family=family, kind="model")
    try:
        return load_model(card, device=device, dtype=dtype)
    except Exception as exc:  # fairseq2 raises many types (network, card, shape, a broken install)
        if is_network_error(exc):
            hint = (" Without network access, pass a local asset card (.yaml) or checkpoint file instead "
                    "(see README: 'Offline models').")
        elif isinstance(card, str) and is_unknown_name(exc):
            hint = " It is not a card name fairseq2 / sonar-space knows: check the name, or pass a local card (.yaml) or checkpoint file."
        else:
            hint = ""
        raise ConfigError(f"cannot load SONAR model {spec!r}: {describe_cause(exc)}.{hint}") from exc


def load_sonar_tokenizer(spec: str | Path) -> Any:
    """Load a SONAR (NLLB-family) tokenizer through fairseq2, with a clear error."""
    from fairseq2.data.tokenizers import load_tokenizer

    card = resolve_card(spec, family=DECODER_FAMILY, kind="tokenizer")
    try:
        return load_tokenizer(card)
    except Exception as exc:
        hint = (" Without network access, pass a local asset card (.yaml) or the SentencePiece model file instead."
                if is_network_error(exc) else "")
        raise ConfigError(f"cannot load tokenizer {spec!r}: {describe_cause(exc)}.{hint}") from exc


def tokenizer_langs(spec: str | Path) -> tuple[str, ...]:
    """The languages a tokenizer spec supports, read from its card (no loading)."""
    card = resolve_card(spec, family=DECODER_FAMILY, kind="tokenizer")
    if isinstance(card, str):
        return flores200_langs()
    langs = card.metadata.get("tokenizer_config", {}).get("_set_", {}).get("langs")
    return tuple(langs) if langs else flores200_langs()


_NETWORK_ERRORS: tuple[type[BaseException], ...] = (ConnectionError, TimeoutError, socket.gaierror, socket.timeout,
                                                    urllib.error.URLError)


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    while exc is not None and all(exc is not s for s in seen):
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__
    return seen


def is_network_error(exc: BaseException) -> bool:
    """True when ``exc`` or an error it was raised from is a failed download / connection."""
    return any(isinstance(e, _NETWORK_ERRORS) or "Download" in type(e).__name__ for e in _chain(exc))


def is_unknown_name(exc: BaseException) -> bool:
    """True when fairseq2 did not know the asset name (``ModelNotKnownError``, ``AssetNotFoundError``)."""
    return any(type(e).__name__ in ("ModelNotKnownError", "AssetNotFoundError", "TokenizerNotKnownError") for e in _chain(exc))


def describe_cause(exc: BaseException) -> str:
    """``Type: first line`` of ``exc`` and, when different, of the error at the root of its chain."""
    chain = _chain(exc)
    parts = [f"{type(exc).__name__}: {_first_line(exc)}"]
    if len(chain) > 1:
        root = chain[-1]
        parts.append(f"caused by {type(root).__name__}: {_first_line(root)}")
    return "; ".join(parts)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0].rstrip(".") if text else type(exc).__name__
