"""The docs: the MkDocs site builds with --strict (a broken link fails it), and the README stays short with links
that resolve."""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 200


def _mkdocs_build(config: Path, site: Path) -> subprocess.CompletedProcess:
    """`mkdocs build --strict` as scripts/test.sh runs it (mkdocs from the docs extra: ./app[docs])."""
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d", str(site)],
        capture_output=True, text=True, timeout=300, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )


def test_docs_build_strict(tmp_path):
    built = _mkdocs_build(ROOT / "mkdocs.yml", tmp_path / "site")
    assert built.returncode == 0, f"mkdocs build --strict failed:\n{built.stderr}"
    assert (tmp_path / "site" / "reference" / "settings" / "index.html").exists()


def test_a_broken_link_fails_the_strict_build(tmp_path):
    shutil.copy(ROOT / "mkdocs.yml", tmp_path / "mkdocs.yml")
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    page = tmp_path / "docs" / "troubleshooting.md"
    broken = "\nSee [a page](no-such-page.md) and [a section](datasets.md#no-such-anchor).\n"
    page.write_text(page.read_text() + broken)
    built = _mkdocs_build(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert built.returncode != 0
    assert "no-such-page.md" in built.stderr and "no-such-anchor" in built.stderr


def _slug(heading: str) -> str:
    """The anchor MkDocs' toc gives a heading (lowercase, punctuation dropped, spaces as hyphens)."""
    text = re.sub(r"[^\w\s-]", "", heading.strip().lower())
    return re.sub(r"[\s]+", "-", text)


def test_readme_is_short_and_its_links_resolve():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= README_MAX_LINES, "README.md grew past 200 lines: move the detail to docs/"
    for command in ("./scripts/demo.sh", "./scripts/test.sh", './scripts/test.sh -m "not slow"', "mkdocs serve"):
        assert command in text, f"README.md no longer names {command}"
    broken = []
    for target in re.findall(r"\]\(([^)]+)\)", text):
        if target.startswith("http"):
            continue
        path, _, anchor = target.partition("#")
        headings = re.findall(r"^#+ (.+)$", (ROOT / path).read_text(), re.M) if (ROOT / path).is_file() else None
        if headings is None or (anchor and anchor not in {_slug(h) for h in headings}):
            broken.append(target)
    assert broken == [], f"README.md links to missing files or headings: {broken}"
