"""Package a fine-tuned encoder as a tarball with its records and an honest model card.

``sonar-ft export --run_dir DIR --out sonar_encoder_finetuned.tar.gz`` packs ``best_encoder.pt``,
``config.json``, ``tokenizer.json``, the metrics, a model card (``README.md``), the test scores when
they belong to this very encoder (SHA-256 checked), and a local decoder card with its files when
they are small (the demo's), so the tarball translates from any folder (:mod:`sonar_ft.inference.translate`).
Reading it back: :mod:`sonar_ft.export.load`.
"""

from __future__ import annotations

import argparse
import json
import logging
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sonar_ft.errors import ConfigError
from sonar_ft.export.load import ENCODER_FILE, local_file, looks_local, recorded_file
from sonar_ft.files import atomic
from sonar_ft.run_files import CONFIG_FILE, TEST_RESULTS, TOKENIZER_FILE, best_epoch, read_history

log = logging.getLogger(__name__)

MAX_PACKED_DECODER_BYTES = 256 * 1024**2
"""Local decoder files up to this size (all together) are packed; the real SONAR decoder (~3 GB) is named instead."""
BASE_MODEL = "dm_70h_ub_sonar_encoder.pth"
LICENCE = (
    "The starting encoder is Meta's SONAR ASL encoder published by facebookresearch/ssvp_slt, whose code and "
    "weights are released primarily under CC-BY-NC 4.0 (non-commercial; see its LICENSE for the parts under other "
    "terms). This fine-tuned encoder is a derivative of those weights: use it under the same terms. The frozen "
    "SONAR text decoder keeps the licence of facebookresearch/SONAR."
)


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
    best = best_epoch(history)
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
        "from sonar_ft.models.encoder import load_encoder",
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


@dataclass
class _Packed:
    """Files that carry the run's local decoder / tokenizer into the tarball, and what translate reads."""

    staged: dict[str, Path] = field(default_factory=dict)  # member name -> file to add
    decoder: str | None = None  # member translate loads as decoder
    tokenizer: str | None = None  # member translate loads as tokenizer (None: the decoder's own)
    note: str | None = None


def _rewrite_card(card: Path, staged: Path, member: str, files: dict[str, str]) -> dict[str, Path]:
    """Copy ``card`` as ``member`` with its checkpoint / tokenizer pointing at the packed names; return what to add."""
    meta = yaml.safe_load(card.read_text(encoding="utf-8"))
    out = {member: staged / member}
    for key, name in files.items():
        source = local_file(meta.get(key), card.parent)
        if source is not None:
            meta[key] = name
            out[name] = source
    atomic.write_text(staged / member, yaml.safe_dump(meta, sort_keys=False))
    return out


def _pack_decoder(record: dict[str, Any], staged: Path) -> _Packed:
    """Pack a local decoder card (and its files) or checkpoint, and a local tokenizer, when small enough."""
    packed = _Packed()
    decoder_file = recorded_file(record, "decoder")
    own_tokenizer = record.get("tokenizer") in (None, record.get("decoder"))
    tokenizer_file = None if own_tokenizer else recorded_file(record, "tokenizer")
    if decoder_file is None and tokenizer_file is None:
        if looks_local(record.get("decoder")):
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
    needed = [run_dir / ENCODER_FILE, run_dir / CONFIG_FILE, run_dir / TOKENIZER_FILE]
    missing = [p.name for p in needed if not p.is_file()]
    if missing:
        raise ConfigError(
            f"--run_dir {run_dir} has no {', '.join(missing)}: export needs a finished training run "
            "(train with train_sonar_finetuning.py first)"
        )
    check_export_paths(run_dir, out, needed, test_results)
    config = _read_record(run_dir / CONFIG_FILE)
    tokenizer = _read_record(run_dir / TOKENIZER_FILE)
    history = read_history(run_dir)
    notes: list[str] = []
    test_path = Path(test_results) if test_results else run_dir / TEST_RESULTS
    test = None
    if test_path.is_file():
        test, note = _check_test_results(test_path, atomic.file_sha256(run_dir / ENCODER_FILE, limit=None), explicit=test_results is not None)
        notes += [note] if note else []
    with tempfile.TemporaryDirectory() as tmp:
        staged = Path(tmp)
        packed = _pack_decoder(tokenizer, staged)
        notes += [packed.note] if packed.note else []
        record = {**tokenizer, "packed": {"decoder": packed.decoder, "tokenizer": packed.tokenizer}}
        atomic.write_json(staged / TOKENIZER_FILE, record)
        atomic.write_text(staged / "README.md", model_card(config, tokenizer, history, test, file_name=out.name, notes=notes))
        atomic.write_json(staged / "metrics.json", history)
        members = {ENCODER_FILE: run_dir / ENCODER_FILE, CONFIG_FILE: run_dir / CONFIG_FILE,
                   TOKENIZER_FILE: staged / TOKENIZER_FILE, "README.md": staged / "README.md", "metrics.json": staged / "metrics.json"}
        if test:
            atomic.write_json(staged / TEST_RESULTS, {k: v for k, v in test.items() if k != "samples"})
            members[TEST_RESULTS] = staged / TEST_RESULTS
        members.update(packed.staged)
        # Weights barely compress: the tarball needs about the members' size.
        with atomic.atomic_path(out, needed=sum(p.stat().st_size for p in members.values())) as tmp_out:
            with tarfile.open(tmp_out, "w:gz") as tar:
                for name, path in members.items():
                    tar.add(path, arcname=name, recursive=False)
    for note in notes:
        log.warning("%s", note)
    return ExportReport(out, list(members), notes)


def check_export_paths(run_dir: Path, out: Path, needed: list[Path], test_results: str | Path | None) -> None:
    """Refuse an --out that is a folder or would replace one of the run's files, and a missing --test_results."""
    from sonar_ft.files.guards import check_not_folder, check_not_run_record, check_output_not_input

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
# Commands
# ------------------------------------------------------------------------------------------------
def _cmd_export(args: argparse.Namespace) -> int:
    from sonar_ft.files.lock import output_lock

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


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("export", help="pack a run's best encoder + records + model card as a tarball")
    p.add_argument("--run_dir", "--run-dir", required=True, help="output folder of a training run")
    p.add_argument("--out", default="sonar_encoder_finetuned.tar.gz", help="tarball to write")
    p.add_argument("--test_results", "--test-results", help="test_results.json to include (default: the run folder's)")
    p.set_defaults(func=_cmd_export)
