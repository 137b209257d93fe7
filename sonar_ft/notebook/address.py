"""The project's address, set in one place: ``[tool.sonar_ft] repository`` in ``pyproject.toml``.

The notebooks' ``REPO_URL`` default, their "Open in Colab" badge and the README's notebook table
are written from it by ``python -m sonar_ft.notebook.address`` (then ``jupytext --sync notebooks/*.py``);
a test checks they agree with it. Empty (the default, until the project is published), no badge
points anywhere and the notebooks say how to bring the project onto a runtime instead.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

from sonar_ft.files import atomic

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = "notebooks"
BADGE_IMAGE = "https://colab.research.google.com/assets/colab-badge.svg"
NO_BADGE = "*(upload to Colab: File → Upload notebook)*"
_REPO_LINE = re.compile(r'^REPO_URL = "[^"]*"(\s*#.*)?$', re.M)
_NB_BADGE = re.compile(r"^# (\[!\[Open In Colab\]\([^)]*\)\]\([^)]*\)|\*\(upload to Colab: File → Upload notebook\)\*)$", re.M)
_README_ROW = re.compile(r"^\| (\[!\[Open In Colab\]\([^)]*\)\]\([^)]*\)|\*\(upload to Colab: File → Upload notebook\)\*) \| (\d\d[a-z]?) ", re.M)


def repository(root: Path = ROOT) -> str:
    """``owner/name`` of the project on GitHub, or ``""`` when none is set."""
    import tomllib

    with open(root / "pyproject.toml", "rb") as f:
        return str(tomllib.load(f).get("tool", {}).get("sonar_ft", {}).get("repository", "")).strip().strip("/")


def repo_url(repo: str) -> str:
    """The git URL the notebooks clone (``""`` when no repository is set)."""
    return f"https://github.com/{repo}" if repo else ""


def badge(repo: str, notebook: str) -> str:
    """Markdown of the "Open in Colab" badge of ``notebook`` (its stem), or how to open it without one."""
    if not repo:
        return NO_BADGE
    return f"[![Open In Colab]({BADGE_IMAGE})](https://colab.research.google.com/github/{repo}/blob/main/{NOTEBOOKS}/{notebook}.ipynb)"


def render(root: Path = ROOT, repo: str | None = None) -> dict[Path, str]:
    """Every file that names the address, as it should read for ``repo`` (default: the setting)."""
    repo = repository(root) if repo is None else repo
    out: dict[Path, str] = {}
    stems = {p.stem.split("_")[0]: p.stem for p in sorted((root / NOTEBOOKS).glob("*.py"))}  # "01", "01b", ...
    for stem in stems.values():
        path = root / NOTEBOOKS / f"{stem}.py"
        text = path.read_text(encoding="utf-8")
        text = _REPO_LINE.sub(lambda m: f'REPO_URL = "{repo_url(repo)}"{m.group(1) or ""}', text)
        out[path] = _NB_BADGE.sub("# " + badge(repo, stem).replace("\\", "\\\\"), text)
    readme = root / "README.md"
    text = readme.read_text(encoding="utf-8")
    out[readme] = _README_ROW.sub(lambda m: f"| {badge(repo, stems.get(m.group(2), m.group(2)))} | {m.group(2)} ", text)
    return out


def main() -> int:
    changed = [p for p, text in render().items() if p.read_text(encoding="utf-8") != text]
    for path, text in render().items():
        if path in changed:
            atomic.write_text(path, text)
    print(f"repository: {repository() or '(none set)'}; rewrote {len(changed)} file(s)"
          + ("; now run: jupytext --sync notebooks/*.py" if changed else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
