"""The generated references (docs/reference/settings.md, refusals.md) are current; every ZK0_ setting has a row."""

import importlib.util
import re
from pathlib import Path

from pydantic import Field

from zk0.node_settings import NodeSettings
from zk0.settings import ServerSettings
from zk0.settings_names import DEPLOYMENT_NODE_SETTINGS, DEPLOYMENT_SETTINGS

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("reference_docs", ROOT / "scripts" / "reference_docs.py")
reference_docs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(reference_docs)


def _rows(page: str) -> set[str]:
    """The variables in the first column of the page's tables."""
    return set(re.findall(r"^\| `(ZK0_[A-Z0-9_<>i]+)` \|", page, flags=re.MULTILINE))


def test_committed_reference_pages_are_the_generated_ones():
    stale = [path.name for path, text in reference_docs.pages().items()
             if not path.exists() or path.read_text() != text]
    assert stale == [], f"docs/reference/ {stale} stale: run `{reference_docs.COMMAND}` and commit the pages"


def test_refusals_page_holds_the_preflight_and_compose_messages():
    page = reference_docs.REFUSALS_PAGE.read_text()
    for words in ("unknown variable(s)", "holding out", "is not reachable after", "set ZK0_NODE_0_DATASET to node 0"):
        assert words in page, f"{words!r} missing from docs/reference/refusals.md"


def test_every_zk0_setting_has_a_row_with_a_description():
    expected = (
        {f"ZK0_{name.upper()}" for name in ServerSettings.model_fields}
        | {f"ZK0_NODE_<i>_{name.upper()}" for name in NodeSettings.model_fields}
        | {f"ZK0_{name}" for name in DEPLOYMENT_SETTINGS}
        | {f"ZK0_NODE_<i>_{name}" for name in DEPLOYMENT_NODE_SETTINGS}
    )
    assert _rows(reference_docs.SETTINGS_PAGE.read_text()) == expected
    undescribed = [name for cls in (ServerSettings, NodeSettings) for name, field in cls.model_fields.items()
                   if not (field.description or "").strip()]
    assert undescribed == [], f"give these fields a Field(description=...): {undescribed}"


def test_a_new_setting_makes_the_committed_page_stale(monkeypatch, capsys):
    class WithProbe(ServerSettings):
        probe_every: int = Field(2, ge=1, description="A probe setting | with <angle> brackets.")

    monkeypatch.setattr(reference_docs, "ServerSettings", WithProbe)
    page = reference_docs.settings_page()
    row = next(line for line in page.splitlines() if line.startswith("| `ZK0_PROBE_EVERY` |"))
    assert "| int, >= 1 | `2` |" in row and "run config `probe-every`" in row and "not passed by Compose" in row
    assert "A probe setting \\| with &lt;angle&gt; brackets." in row
    assert reference_docs.main(["--check"]) == 1
    assert reference_docs.COMMAND in capsys.readouterr().err
