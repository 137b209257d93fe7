"""Package a fine-tuned encoder as a tarball, load it back safely, and translate with it.

``sonar-ft export --run_dir DIR --out sonar_encoder_finetuned.tar.gz`` packs ``best_encoder.pt``,
``config.json``, ``tokenizer.json``, the metrics, a model card (``README.md``), the test scores when
they belong to this very encoder (SHA-256 checked), and a local decoder card with its files when
they are small (the demo's), so the tarball translates from any folder.
``sonar-ft translate --encoder TARBALL_OR_CKPT --features ... --tgt_langs eng_Latn,fra_Latn``
loads it back (members are checked before anything is extracted) and decodes each clip into every
requested language — SONAR's decoder speaks 200 of them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import unquote, urlparse

import yaml

from sonar_ft import io
from sonar_ft.errors import CheckpointError, ConfigError, DataError

log = logging.getLogger(__name__)

ENCODER_FILE = "best_encoder.pt"
REQUIRED_MEMBERS = (ENCODER_FILE, "config.json", "tokenizer.json", "README.md")
# A local decoder travels as these fixed names (never the names it had): card, weights, tokenizer.
PACKED_DECODER = ("decoder.yaml", "decoder.pt", "tokenizer.yaml", "tokenizer.model")
OPTIONAL_MEMBERS = ("metrics.json", "test_results.json", *PACKED_DECODER)
ALLOWED_MEMBERS = frozenset(REQUIRED_MEMBERS + OPTIONAL_MEMBERS)
MAX_MEMBER_BYTES = 16 * 1024**3  # no real encoder is larger; refuses decompression bombs
MAX_PACKED_DECODER_BYTES = 256 * 1024**2
"""Local decoder files up to this size (all together) are packed; the real SONAR decoder (~3 GB) is named instead."""
BASE_MODEL = "dm_70h_ub_sonar_encoder.pth"
LICENCE = (
    "The starting encoder is Meta's SONAR ASL encoder published by facebookresearch/ssvp_slt, whose code and "
    "weights are released primarily under CC-BY-NC 4.0 (non-commercial; see its LICENSE for the parts under other "
    "terms). This fine-tuned encoder is a derivative of those weights: use it under the same terms. The frozen "
    "SONAR text decoder keeps the licence of facebookresearch/SONAR."
)
# A real export has at most len(ALLOWED_MEMBERS) members: counted while reading headers, so a small
# tarball with 200,000 members is refused after a few headers instead of extracted for minutes.
MAX_MEMBERS = 16
MAX_TOTAL_BYTES = 32 * 1024**3


# ------------------------------------------------------------------------------------------------
# Export
# ------------------------------------------------------------------------------------------------
def _latest_metrics(run_dir: Path) -> list[dict[str, Any]]:
    files = sorted(run_dir.glob("metrics_epoch*.json"), key=lambda p: int(p.stem.removeprefix("metrics_epoch") or 0))
    out = []
    for f in files:
        try:
            out.append(json.loads(f.read_text(encoding="utf-8")))
        except (OSError, json.JSONDecodeError):
            log.warning("skipping unreadable %s", f)
    return out


def _best_epoch(history: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The epoch whose encoder is ``best_encoder.pt``: the last one the run marked best."""
    marked = [h for h in history if h.get("is_best")]
    if marked:
        return marked[-1]
    evaluated = [h for h in history if h.get("val_bleu") is not None]
    return max(evaluated, key=lambda h: h["val_bleu"]) if evaluated else None


def _fmt(value: Any, digits: int = 2) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "n/a"


def _score_line(scores: dict[str, Any], prefix: str = "") -> str:
    """``BLEU-1/2/3/4 a/b/c/d | ROUGE-L x | chrF y`` (+ semantic scores when present) from ``val_*`` or plain keys."""
    get = lambda k: scores.get(prefix + k)  # noqa: E731
    line = (
        f"BLEU-1/2/3/4 {'/'.join(_fmt(get(f'bleu{n}')) for n in (1, 2, 3, 4))} (BLEU {_fmt(get('bleu'))}) | "
        f"ROUGE-L {_fmt(get('rougeL'))} | chrF {_fmt(get('chrf'))}"
    )
    if get("loss") is not None:
        line += f" | loss {_fmt(get('loss'), 4)}"
    if get("cosine") is not None:
        line += f" | cosine to reference text embedding {_fmt(get('cosine'), 3)} | retrieval R@1 {_fmt(get('r1'), 1)}%, R@5 {_fmt(get('r5'), 1)}%"
    return line


def _data_lines(s: dict[str, Any]) -> list[str]:
    """What training data the run really used: manifests and the limits applied to them."""
    lines = [f"- training data: `{s.get('train_manifest')}` (validation `{s.get('val_manifest')}`)"]
    limits = []
    if s.get("max_samples"):
        limits.append(f"at most {s['max_samples']} clips per split (`--max_samples {s['max_samples']}`)")
    if s.get("subset_fraction"):
        limits.append(f"a seeded {s['subset_fraction']:.0%} of the training clips (`--subset_fraction {s['subset_fraction']}`)")
    if s.get("max_frames"):
        limits.append(f"clips cut to {s['max_frames']} frames (`--max_frames {s['max_frames']}`)")
    if limits:
        lines.append("- **only part of the data was used**: " + "; ".join(limits)
                     + ". Scores of such a run are not those of a full fine-tuning.")
    else:
        lines.append("- all clips of the training manifest (no `--max_samples` / `--subset_fraction`)")
    return lines


def model_card(
    config: dict[str, Any],
    tokenizer: dict[str, Any],
    history: list[dict[str, Any]],
    test: dict[str, Any] | None,
    *,
    file_name: str = "sonar_encoder_finetuned.tar.gz",
    notes: list[str] | None = None,
) -> str:
    """The README of an export: model, base model and licence, data used, scores, intended use, limitations, use."""
    s = config.get("settings", {})
    arch = config.get("encoder_architecture", {})
    dim = arch.get("output_dim", "?")
    best = _best_epoch(history)
    started = s.get("encoder_checkpoint")
    lines = [
        "# Fine-tuned SONAR ASL encoder",
        "",
        "A SignT5 SONAR encoder (ssvp_slt `SignT5SonarEncoder` checkpoint layout, weights under `student`) that maps",
        f"SignHiera video features `(T, {arch.get('feature_dim', 'D')})` to a {dim}-dimensional SONAR sentence embedding,",
        "fine-tuned with token cross-entropy through the frozen SONAR text decoder (only the encoder was trained).",
        "",
        "## Base model and licence",
        f"- started from: `{started}`" + ("" if Path(str(started)).name == BASE_MODEL else
                                           f" (the official base model is ssvp_slt's `{BASE_MODEL}`)"),
        f"- {LICENCE}",
        "",
        "## Architecture",
        f"d_model {arch.get('d_model')}, {arch.get('num_encoder_layers')}+{arch.get('num_decoder_layers')} layers, "
        f"{arch.get('num_heads')} heads, feature dim {arch.get('feature_dim')}, embedding dim {dim}.",
        "",
        "## Training",
        *_data_lines(s),
        f"- decoder: `{tokenizer.get('decoder')}`, target language `{tokenizer.get('tgt_lang')}`",
        f"- epochs {s.get('epochs')}, batch {s.get('batch_size')} x accumulation {s.get('grad_accum')}, "
        f"learning rate {s.get('learning_rate')}, weight decay {s.get('weight_decay')}, label smoothing {s.get('label_smoothing')}, "
        f"best checkpoint by validation {s.get('select_metric')}",
        "",
        "## Scores",
    ]
    if best:
        lines.append(f"- validation, epoch {best['epoch']} (the packed encoder): {_score_line(best, 'val_')}")
    if test:
        data = test.get("data") or {}
        limit = f", at most {data['max_samples']} clips (`--max_samples`)" if data.get("max_samples") else ""
        lines.append(f"- test: {_score_line(test)} on {test.get('num_samples')} clips of `{test.get('manifest')}`{limit}, "
                     f"beam {test.get('beam_size')}")
        if test.get("encoder_sha256"):
            lines.append(f"- the test scores are of this very encoder: SHA-256 `{test['encoder_sha256']}` of `{ENCODER_FILE}`")
        lines.append(f"- `{test.get('bleu_signature', '')}`")
        lines.append(f"- ROUGE-L: `{test.get('rouge_signature', '')}`")
    if not best and not test:
        lines.append("- no evaluation recorded")
    for note in notes or []:
        lines.append(f"- note: {note}")
    lines += [
        "",
        "## Intended use",
        "Research on sign-language translation and on SONAR's shared sentence-embedding space: embedding ASL clips",
        "(as SignHiera features), translating them into SONAR's languages, comparing with published results.",
        "Not for decisions about people, not a replacement for a human interpreter, not for commercial use (licence).",
        "",
        "## Limitations",
        "- Sign-language translation is far from solved: on How2Sign the published state of the art is about",
        "  15-19 BLEU-4 (ssvp_slt and later work); expect many wrong or fluent-but-unfaithful sentences.",
        "- The encoder reads SignHiera features only; other feature extractors need another encoder.",
        f"- It was fine-tuned towards `{tokenizer.get('tgt_lang')}`; other target languages go through SONAR's shared",
        "  space untrained and are usually worse.",
        "- How2Sign is instructional American Sign Language from a small number of signers; other domains,",
        "  signers and sign languages are out of distribution.",
        "",
        "## Use",
        "```bash",
        f"sonar-ft translate --encoder {file_name} --features FEATURES_DIR --tgt_langs eng_Latn,fra_Latn",
        f"sonar-ft embed --encoder {file_name} --features FEATURES_DIR --out embeddings.npy",
        "```",
        "```python",
        "from sonar_ft.encoder import load_encoder",
        f"encoder, config = load_encoder('{ENCODER_FILE}')  # features (B,T,D), mask (B,T) -> (B, {dim})",
        "```",
        "",
    ]
    return "\n".join(lines)


def _check_test_results(path: Path, encoder_sha: str, *, explicit: bool) -> tuple[dict[str, Any] | None, str | None]:
    """The test scores at ``path`` when they belong to the encoder with SHA-256 ``encoder_sha``; else why not."""
    flag = f"--test_results {path}" if explicit else str(path)
    try:
        test = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        if explicit:
            raise ConfigError(f"{flag}: cannot read it ({exc}); give a test_results.json written by --eval_only") from None
        return None, f"test scores left out: {path} is unreadable ({exc})"
    if not isinstance(test, dict):
        raise ConfigError(f"{flag} is not a test_results.json (a JSON object written by --eval_only)")
    rerun = (f"evaluate the packed encoder with `python train_sonar_finetuning.py --eval_only --encoder_checkpoint "
             f"RUN_DIR/{ENCODER_FILE} --val_features TEST_FEATURES --val_manifest TEST_MANIFEST --output_dir RUN_DIR`")
    recorded = test.get("encoder_sha256")
    if not recorded:
        return None, (f"test scores left out: {path} does not record which encoder it evaluated (no encoder_sha256); {rerun}")
    if recorded != encoder_sha:
        return None, (f"test scores left out: {path} evaluated another encoder ({test.get('encoder_checkpoint')}, "
                      f"SHA-256 {recorded[:12]}...) than the packed {ENCODER_FILE} (SHA-256 {encoder_sha[:12]}...), e.g. "
                      f"before the run was resumed or from another run; {rerun}")
    return test, None


def _local_file(value: Any, base: Path | None = None) -> Path | None:
    """A local file named by ``value`` (plain path, relative to ``base`` when given, or ``file://`` URI), else None."""
    if not isinstance(value, str) or not value:
        return None
    if value.startswith("file://"):
        path = Path(unquote(urlparse(value).path))
    elif "://" in value:
        return None
    else:
        path = Path(value).expanduser()
        if not path.is_absolute() and base is not None:
            path = base / path
    return path if path.is_file() else None


@dataclass
class _Packed:
    """Files that carry the run's local decoder / tokenizer into the tarball, and what translate reads."""

    staged: dict[str, Path] = field(default_factory=dict)  # member name -> file to add
    decoder: str | None = None  # member translate loads as decoder
    tokenizer: str | None = None  # member translate loads as tokenizer (None: the decoder's own)
    note: str | None = None


def _recorded_file(record: dict[str, Any], key: str) -> Path | None:
    """The local file a ``tokenizer.json`` entry names: its recorded absolute path, else the path as typed."""
    return _local_file(record.get(f"{key}_file")) or _local_file(record.get(key))


def _rewrite_card(card: Path, staged: Path, member: str, files: dict[str, str]) -> dict[str, Path]:
    """Copy ``card`` as ``member`` with its checkpoint / tokenizer pointing at the packed names; return what to add."""
    meta = yaml.safe_load(card.read_text(encoding="utf-8"))
    out = {member: staged / member}
    for key, name in files.items():
        source = _local_file(meta.get(key), card.parent)
        if source is not None:
            meta[key] = name
            out[name] = source
    io.write_text(staged / member, yaml.safe_dump(meta, sort_keys=False))
    return out


def _pack_decoder(record: dict[str, Any], staged: Path) -> _Packed:
    """Pack a local decoder card (and its files) or checkpoint, and a local tokenizer, when small enough."""
    packed = _Packed()
    decoder_file = _recorded_file(record, "decoder")
    own_tokenizer = record.get("tokenizer") in (None, record.get("decoder"))
    tokenizer_file = None if own_tokenizer else _recorded_file(record, "tokenizer")
    if decoder_file is None and tokenizer_file is None:
        if _looks_local(record.get("decoder")):
            packed.note = (f"the run's decoder {record.get('decoder')!r} was a local file that is not found from here, so it "
                           "is not packed: give `--decoder PATH` (its asset card or checkpoint) to `sonar-ft translate`")
        return packed  # an asset card name (e.g. text_sonar_basic_decoder): fairseq2 finds it by name
    files: dict[str, Path] = {}
    if decoder_file is not None and decoder_file.suffix in (".yaml", ".yml"):
        wanted = {"checkpoint": "decoder.pt"} if not own_tokenizer else {"checkpoint": "decoder.pt", "tokenizer": "tokenizer.model"}
        files.update(_rewrite_card(decoder_file, staged, "decoder.yaml", wanted))
        packed.decoder = "decoder.yaml"
    elif decoder_file is not None:
        files["decoder.pt"] = decoder_file
        packed.decoder = "decoder.pt"
    if tokenizer_file is not None and tokenizer_file.suffix in (".yaml", ".yml"):
        files.update(_rewrite_card(tokenizer_file, staged, "tokenizer.yaml", {"tokenizer": "tokenizer.model"}))
        packed.tokenizer = "tokenizer.yaml"
    elif tokenizer_file is not None:
        files["tokenizer.model"] = tokenizer_file
        packed.tokenizer = "tokenizer.model"
    size = sum(p.stat().st_size for p in files.values())
    if size > MAX_PACKED_DECODER_BYTES:
        flags = f"`--decoder {decoder_file}`" if decoder_file else ""
        if tokenizer_file:
            flags += (" and " if flags else "") + f"`--tokenizer {tokenizer_file}`"
        packed = _Packed(note=(f"the run's local decoder files ({size / 1e9:.1f} GB) are too large to pack "
                               f"(limit {MAX_PACKED_DECODER_BYTES / 1e6:.0f} MB): give {flags} to `sonar-ft translate`"))
        return packed
    packed.staged = files
    return packed


def _looks_local(spec: Any) -> bool:
    text = str(spec or "")
    return "/" in text or Path(text).suffix in (".yaml", ".yml", ".pt", ".pth", ".model")


@dataclass
class ExportReport:
    """What ``export_run`` wrote: the tarball, its members, and notes for the user (also in the card)."""

    path: Path
    members: list[str]
    notes: list[str]


def export_run(run_dir: str | Path, out: str | Path, *, test_results: str | Path | None = None) -> Path:
    """Pack a run folder's best encoder, records and a model card into ``out`` (.tar.gz), atomically."""
    return build_export(run_dir, out, test_results=test_results).path


def build_export(run_dir: str | Path, out: str | Path, *, test_results: str | Path | None = None) -> ExportReport:
    """:func:`export_run`, also returning the members and notes (test scores left out, decoder not packed)."""
    run_dir, out = Path(run_dir), Path(out)
    needed = [run_dir / ENCODER_FILE, run_dir / "config.json", run_dir / "tokenizer.json"]
    missing = [p.name for p in needed if not p.is_file()]
    if missing:
        raise ConfigError(
            f"--run_dir {run_dir} has no {', '.join(missing)}: export needs a finished training run "
            "(train with train_sonar_finetuning.py first)"
        )
    check_export_paths(run_dir, out, needed, test_results)
    config = _read_record(run_dir / "config.json")
    tokenizer = _read_record(run_dir / "tokenizer.json")
    history = _latest_metrics(run_dir)
    notes: list[str] = []
    test_path = Path(test_results) if test_results else run_dir / "test_results.json"
    test = None
    if test_path.is_file():
        test, note = _check_test_results(test_path, io.file_sha256(run_dir / ENCODER_FILE, limit=None), explicit=test_results is not None)
        notes += [note] if note else []
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp)
        packed = _pack_decoder(tokenizer, staged)
        notes += [packed.note] if packed.note else []
        record = {**tokenizer, "packed": {"decoder": packed.decoder, "tokenizer": packed.tokenizer}}
        io.write_json(staged / "tokenizer.json", record)
        io.write_text(staged / "README.md", model_card(config, tokenizer, history, test, file_name=out.name, notes=notes))
        io.write_json(staged / "metrics.json", history)
        members = {ENCODER_FILE: run_dir / ENCODER_FILE, "config.json": run_dir / "config.json",
                   "tokenizer.json": staged / "tokenizer.json", "README.md": staged / "README.md", "metrics.json": staged / "metrics.json"}
        if test:
            io.write_json(staged / "test_results.json", {k: v for k, v in test.items() if k != "samples"})
            members["test_results.json"] = staged / "test_results.json"
        members.update(packed.staged)
        with io.atomic_path(out) as tmp_out:
            with tarfile.open(tmp_out, "w:gz") as tar:
                for name, path in members.items():
                    tar.add(path, arcname=name, recursive=False)
    for note in notes:
        log.warning("%s", note)
    return ExportReport(out, list(members), notes)


def check_export_paths(run_dir: Path, out: Path, needed: list[Path], test_results: str | Path | None) -> None:
    """Refuse an --out that is a folder or would replace one of the run's files, and a missing --test_results."""
    from sonar_ft.paths import check_not_folder, check_not_run_record, check_output_not_input

    check_not_folder(out, example="sonar_encoder_finetuned.tar.gz")
    check_not_run_record(out)
    check_output_not_input(out, [("--run_dir's", p) for p in needed] + [("--test_results", test_results)])
    if test_results and not Path(test_results).is_file():
        raise ConfigError(f"--test_results {test_results} not found; give the test_results.json written by --eval_only, or leave it out")


def _read_record(path: Path) -> dict[str, Any]:
    """A JSON record of a run (config.json...), with an error naming it when it is unreadable."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(
            f"cannot read {path}: {exc}. The run's records are damaged; re-run training into this folder (or "
            "evaluate again for test_results.json) before exporting"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} does not hold a JSON object; the run's records are damaged")
    return data


# ------------------------------------------------------------------------------------------------
# Safe loading
# ------------------------------------------------------------------------------------------------
def check_members(tar: tarfile.TarFile, source: Path) -> list[tarfile.TarInfo]:
    """Refuse absolute paths, ``..``, links, devices, unexpected names and oversized members."""
    members = read_members(tar, source)
    for m in members:
        name = m.name
        if name.startswith("/") or ".." in Path(name).parts or "/" in name.strip("./"):
            raise CheckpointError(f"{source}: refusing member {name!r} (absolute path, '..' or a folder): not a sonar-ft export")
        if not m.isfile():
            raise CheckpointError(f"{source}: refusing member {name!r} (links, devices and folders are not allowed)")
        if Path(name).name not in ALLOWED_MEMBERS:
            raise CheckpointError(f"{source}: unexpected member {name!r}; a sonar-ft export holds only {', '.join(sorted(ALLOWED_MEMBERS))}")
        if m.size > MAX_MEMBER_BYTES:
            raise CheckpointError(f"{source}: member {name!r} is implausibly large ({m.size} bytes)")
    names = {Path(m.name).name for m in members}
    missing = [n for n in REQUIRED_MEMBERS if n not in names]
    if missing:
        raise CheckpointError(f"{source}: not a complete sonar-ft export (missing {', '.join(missing)})")
    return members


def read_members(tar: tarfile.TarFile, source: Path) -> list[tarfile.TarInfo]:
    """The members of ``tar``, read header by header: more than :data:`MAX_MEMBERS`, a name twice, or a total
    size above :data:`MAX_TOTAL_BYTES` is refused before any more headers are read or anything is extracted."""
    members: list[tarfile.TarInfo] = []
    seen: set[str] = set()
    total = 0
    for m in tar:
        members.append(m)
        if len(members) > MAX_MEMBERS:
            raise CheckpointError(
                f"{source}: more than {MAX_MEMBERS} members; a sonar-ft export holds at most {len(ALLOWED_MEMBERS)} "
                "files. Refusing it before extracting anything: it is not a sonar-ft export (export it again)"
            )
        if m.name in seen:
            raise CheckpointError(f"{source}: member {m.name!r} appears twice; not a sonar-ft export (export it again)")
        seen.add(m.name)
        total += max(m.size, 0)
        if total > MAX_TOTAL_BYTES:
            raise CheckpointError(
                f"{source}: its members add up to more than {MAX_TOTAL_BYTES:,} bytes; refusing to extract it"
            )
    return members


def open_export(path: str | Path, into: str | Path) -> dict[str, Path]:
    """Check and extract an export tarball into ``into``; return member name → path."""
    path, into = Path(path), Path(into)
    try:
        with tarfile.open(path, "r:*") as tar:
            members = check_members(tar, path)
            into.mkdir(parents=True, exist_ok=True)
            out = {}
            for m in members:
                target = into / Path(m.name).name
                src = tar.extractfile(m)
                if src is None:
                    raise CheckpointError(f"{path}: cannot read member {m.name!r}")
                with src, io.atomic_path(target) as tmp, open(tmp, "wb") as dst:
                    while chunk := src.read(1 << 20):
                        dst.write(chunk)
                out[target.name] = target
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise CheckpointError(f"cannot read export {path}: {exc}. The file may be truncated; export it again.") from None
    return out


def is_export(path: str | Path) -> bool:
    """Whether ``path`` names an export tarball (``.tar.gz`` / ``.tgz`` / ``.tar``) rather than a checkpoint."""
    path = Path(path)
    return path.suffixes[-2:] == [".tar", ".gz"] or path.suffix in (".tgz", ".tar")


@contextlib.contextmanager
def opened_encoder(path: str | Path) -> Iterator[tuple[Path, dict[str, Path]]]:
    """``(checkpoint, members)`` of an export tarball (checked, extracted to a temporary folder for the
    ``with`` block) or of a plain checkpoint (``members`` empty)."""
    if not is_export(path):
        yield Path(path), {}
        return
    with tempfile.TemporaryDirectory() as tmp:
        files = open_export(path, tmp)
        yield files[ENCODER_FILE], files


def load_any_encoder(path: str | Path, *, device: Any = "cpu") -> tuple[Any, Any]:
    """:func:`sonar_ft.encoder.load_encoder` for a checkpoint or an export tarball."""
    from sonar_ft.encoder import load_encoder

    with opened_encoder(path) as (checkpoint, _):
        return load_encoder(checkpoint, device=device)


def decoder_for(files: dict[str, Path], decoder: str | None, tokenizer: str | None) -> tuple[str, str | None]:
    """The decoder and tokenizer to translate with: the flags when given, else what the export packed or recorded.

    ``--decoder`` alone is enough: the tokenizer then defaults to that decoder's own, not the export's.
    """
    if decoder:
        return decoder, tokenizer
    if "tokenizer.json" not in files:
        return "text_sonar_basic_decoder", tokenizer
    record = json.loads(files["tokenizer.json"].read_text(encoding="utf-8"))
    packed = record.get("packed") or {}
    packed_tokenizer = str(files[packed["tokenizer"]]) if packed.get("tokenizer") in files else None
    tokenizer = tokenizer or packed_tokenizer
    if packed.get("decoder") in files:
        return str(files[packed["decoder"]]), tokenizer
    recorded = str(record.get("decoder") or "text_sonar_basic_decoder")
    recorded_tokenizer = None if record.get("tokenizer") in (None, record.get("decoder")) else record.get("tokenizer")
    if _looks_local(recorded) and _recorded_file(record, "decoder") is None:
        raise ConfigError(
            f"the encoder was trained with the local decoder {recorded!r}, which the export does not hold and which is not "
            "found from here: give --decoder PATH (that decoder's asset card .yaml or checkpoint)"
        )
    decoder_file = _recorded_file(record, "decoder")
    tokenizer_file = _recorded_file(record, "tokenizer")
    return (str(decoder_file) if decoder_file else recorded,
            tokenizer or (str(tokenizer_file) if tokenizer_file and recorded_tokenizer else recorded_tokenizer))


# ------------------------------------------------------------------------------------------------
# Translate
# ------------------------------------------------------------------------------------------------
def translate(
    encoder: str | Path,
    features: str | Path,
    tgt_langs: list[str],
    *,
    decoder: str | None = None,
    tokenizer: str | None = None,
    ids: list[str] | None = None,
    beam_size: int = 5,
    max_gen_len: int = 128,
    batch_size: int = 16,
    device: str = "auto",
) -> list[dict[str, Any]]:
    """Translate feature clips with an exported (or plain checkpoint) encoder into each language.

    Returns one ``{"id": ..., "eng_Latn": text, ...}`` per clip. The decoder defaults to the one the
    encoder was trained with (packed in the export, or recorded in its ``tokenizer.json``).
    """
    import torch

    from sonar_ft.data import FeatureStore, load_feature_file
    from sonar_ft.decoder import FrozenTextDecoder
    from sonar_ft.embed import embed_features
    from sonar_ft.encoder import load_encoder
    from sonar_ft.train import resolve_device

    dev = resolve_device(device)
    with opened_encoder(encoder) as (checkpoint, files):
        model, _ = load_encoder(checkpoint, device=dev)
        decoder_spec, tokenizer_spec = decoder_for(files, decoder, tokenizer)
        dec = FrozenTextDecoder.load(decoder_spec, tokenizer_spec, device=dev)  # while packed files still exist
    for lang in tgt_langs:
        dec.check_lang(lang)
    features = Path(features)
    if features.is_file():
        clip_ids, clips = [features.stem], [load_feature_file(features)]
    else:
        store = FeatureStore.open(features)
        clip_ids = list(ids) if ids else store.ids()
        unknown = [i for i in clip_ids if store.path(i) is None]
        if unknown:
            raise DataError(f"no feature file for {', '.join(unknown[:5])} in {features}")
        clips = [store.load(i) for i in clip_ids]
    _check_clips(clip_ids, clips, model.config.feature_dim, features)
    emb = embed_features(model, clips, batch_size=batch_size, device=dev)
    rows: list[dict[str, Any]] = [{"id": i} for i in clip_ids]
    for lang in tgt_langs:
        texts = dec.generate(emb.to(dev), lang, beam_size=beam_size, max_gen_len=max_gen_len, batch_size=batch_size)
        for row, text in zip(rows, texts):
            row[lang] = text
    torch.cuda.empty_cache() if dev.type == "cuda" else None
    return rows


def _check_clips(clip_ids: list[str], clips: list[Any], feature_dim: int, source: Path) -> None:
    """Refuse clips the encoder cannot embed, naming each (zero frames, wrong dimension, NaN / Inf)."""
    import torch

    problems = []
    for clip_id, clip in zip(clip_ids, clips):
        if clip.shape[0] == 0:
            problems.append(f"{clip_id}: has zero frames")
        elif clip.shape[1] != feature_dim:
            problems.append(f"{clip_id}: has {clip.shape[1]} features per frame but the encoder expects {feature_dim}")
        elif not torch.isfinite(clip).all():
            problems.append(f"{clip_id}: contains NaN or Inf values")
    if problems:
        listed = "; ".join(problems[:10]) + (f"; ... and {len(problems) - 10} more" if len(problems) > 10 else "")
        raise DataError(
            f"{len(problems)} clip(s) in {source} cannot be translated ({listed}). Re-extract them, or pass --ids "
            "with the clips to translate (`sonar-ft verify` lists every bad clip)"
        )


# ------------------------------------------------------------------------------------------------
# Commands
# ------------------------------------------------------------------------------------------------
def _cmd_export(args: argparse.Namespace) -> int:
    from sonar_ft.lock import output_lock

    out = Path(args.out)
    if out.is_dir():  # before the lock, which would put its file inside the folder
        raise ConfigError(f"--out {out} is a folder; give the tarball to write, e.g. {out / 'sonar_encoder_finetuned.tar.gz'}")
    with output_lock(out, folder=False, command="sonar-ft export"):
        report = build_export(args.run_dir, out, test_results=args.test_results)
    out = report.path
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB): {', '.join(report.members)}")
    for note in report.notes:
        print(f"note: {note}")
    return 0


def _cmd_translate(args: argparse.Namespace) -> int:
    langs = [x.strip() for x in args.tgt_langs.split(",") if x.strip()]
    if not langs:
        raise ConfigError("--tgt_langs needs at least one language code, e.g. eng_Latn,fra_Latn")
    ids = [x for x in args.ids.split(",") if x] if args.ids else None
    for flag, value in (("--batch_size", args.batch_size), ("--limit", args.limit), ("--beam_size", args.beam_size),
                        ("--max_gen_len", args.max_gen_len)):
        if value is not None and value < 1:
            hint = "; leave --limit out to print every clip" if flag == "--limit" else ""
            raise ConfigError(f"{flag} must be at least 1 (got {value}){hint}")
    if args.out:
        from sonar_ft.paths import check_not_folder, check_output_not_input

        check_not_folder(args.out, example="translations.json")
        check_output_not_input(args.out, {"--encoder": args.encoder, "--features": args.features})
    rows = translate(
        args.encoder, args.features, langs, decoder=args.decoder, tokenizer=args.tokenizer, ids=ids,
        beam_size=args.beam_size, max_gen_len=args.max_gen_len, batch_size=args.batch_size, device=args.device,
    )
    if args.limit is not None:
        rows = rows[: args.limit]
    for row in rows:
        print(row["id"])
        for lang in langs:
            print(f"  {lang}: {row[lang]}")
    if args.out:
        io.write_json(args.out, rows)
        print(f"wrote {args.out}")
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("export", help="pack a run's best encoder + records + model card as a tarball")
    p.add_argument("--run_dir", "--run-dir", required=True, help="output folder of a training run")
    p.add_argument("--out", default="sonar_encoder_finetuned.tar.gz", help="tarball to write")
    p.add_argument("--test_results", "--test-results", help="test_results.json to include (default: the run folder's)")
    p.set_defaults(func=_cmd_export)

    t = subparsers.add_parser("translate", help="translate feature clips with a fine-tuned encoder")
    t.add_argument("--encoder", required=True, help="export tarball or encoder checkpoint")
    t.add_argument("--features", required=True, help="feature folder or one feature file")
    t.add_argument("--tgt_langs", "--tgt-langs", default="eng_Latn", help="comma-separated FLORES-200 codes")
    t.add_argument("--ids", help="comma-separated clip ids (default: all in the folder)")
    t.add_argument("--limit", type=int, help="print at most this many clips")
    t.add_argument("--decoder", help="decoder: asset card name, card .yaml or checkpoint (default: the one packed in or "
                   "recorded by the export, else text_sonar_basic_decoder)")
    t.add_argument("--tokenizer", help="tokenizer (default: --decoder's own when --decoder is given, else the export's)")
    t.add_argument("--beam_size", "--beam-size", type=int, default=5)
    t.add_argument("--max_gen_len", "--max-gen-len", type=int, default=128)
    t.add_argument("--batch_size", "--batch-size", type=int, default=16)
    t.add_argument("--device", default="auto")
    t.add_argument("--out", help="also write the translations as JSON here")
    t.set_defaults(func=_cmd_translate)
