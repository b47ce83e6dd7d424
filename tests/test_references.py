"""A reader of the repository alone finds everything a docstring, comment or document refers to."""

from __future__ import annotations

import functools
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TEXT = (".py", ".md", ".yaml", ".yml", ".sh", ".toml", ".txt")
TOP = ("rfkit", "tools", "configs", "tests", "docs", "plugins", ".ci")
# a file inside the repository, e.g. ``rfkit/models/dit.py`` or tools/results/bench_ot.{md,png} (globs allowed)
REPO_PATH = re.compile(
    r"(?<![\w./-])((?:" + "|".join(re.escape(t) for t in TOP) + r")/(?:[\w./*-]|\{[\w,]*\})*\.(?:\w+|\{[\w,]*\}))"
)
DOCUMENT = re.compile(r"(?<![\w/.-])([\w-]+\.md)\b")  # a bare document name, e.g. README.md
SECTION = re.compile(r"design\.md §(\d+)")
# paths a run or a command writes (run directories, outputs): not files of the repository
WRITTEN = ("tools/results/demo_reflow",)


@functools.cache
def tracked() -> list[Path]:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [ROOT / p for p in out.split() if p.endswith(TEXT)]


def exists(ref: str) -> bool:
    ref = ref.rstrip(".").split("::")[0]
    if any(ch in ref for ch in "*{"):
        pattern = re.sub(r"\{[^}]*\}", "*", ref)  # {md,png}: either
        return any(ROOT.glob(pattern))
    return (ROOT / ref).exists()


@pytest.mark.parametrize("path", tracked(), ids=lambda p: str(p.relative_to(ROOT)))
def test_referenced_files_exist(path):
    text = path.read_text(errors="replace")
    documents = {p.name for p in tracked() if p.suffix == ".md"}
    missing = [r for r in REPO_PATH.findall(text) if not r.startswith(WRITTEN) and not exists(r)]
    missing += [d for d in DOCUMENT.findall(text) if d not in documents]
    missing += ["seed-notes"] * ("seed-notes" in text and path.name != "test_references.py")
    assert not missing, f"{path.relative_to(ROOT)} refers to what the repository does not hold: {sorted(set(missing))}"


def test_design_sections_exist():
    headings = re.findall(r"^## (\d+)\.", (ROOT / "docs/design.md").read_text(), flags=re.MULTILINE)
    cited = {int(n) for p in tracked() for n in SECTION.findall(p.read_text(errors="replace"))}
    assert cited and cited <= {int(h) for h in headings}
