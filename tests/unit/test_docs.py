"""The docs stay true to the code: the flag tables are the commands' own, and every link lands."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ddml_common.cli import Parser
from scripts import config_doc
from tests.processes import REPO

DOCS = sorted([REPO / "README.md", *(REPO / "docs").glob("*.md")])
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")  # [text](target)


def _rows(tables: str) -> dict[str, str]:
    """Each flag's row, by the command's heading and the flag's first option string."""
    rows, command = {}, ""
    for line in tables.splitlines():
        if line.startswith("## "):
            command = line[3:]
        elif line.startswith("| `-"):
            rows[f"{command} {line.split('`')[1]}"] = line
    return rows


def test_the_configuration_doc_has_every_flag_with_its_help_default_and_variables():
    document = config_doc.DOC.read_text()
    written = document.partition(config_doc.BEGIN)[2].partition(config_doc.END)[0]
    expected = config_doc.render()
    stale = "docs/configuration.md is stale: run .venv/bin/python scripts/config_doc.py"
    rows, expected_rows = _rows(written), _rows(expected)
    changed = sorted(flag for flag in rows.keys() | expected_rows.keys() if rows.get(flag) != expected_rows.get(flag))
    assert changed == [], stale  # names the flags that are missing, gone or changed
    assert written.strip() == expected.strip(), stale  # and the descriptions around them
    assert len(_rows(expected)) > 80  # every command's flags, not an empty render


def test_a_new_flag_or_a_changed_help_changes_the_table():
    parser = Parser("ddml-test", "A test command.")
    parser.add_argument("--max-wait-ms", type=float, default=0.0, help="hold a batch | this long")
    before = config_doc.command_table(parser)
    assert ("| `--max-wait-ms` | `0.0` | `DDML_TEST_MAX_WAIT_MS`, `DDML_MAX_WAIT_MS` | hold a batch \\| this long |"
            in before.splitlines())

    parser.add_argument("--new-flag", action="store_true", help="something new")
    assert "| `--new-flag` | off | `DDML_TEST_NEW_FLAG`, `DDML_NEW_FLAG` | something new |" in config_doc.command_table(parser)

    parser._option_string_actions["--max-wait-ms"].help = "hold a batch longer"
    assert "hold a batch longer" in config_doc.command_table(parser) and "| this long" not in config_doc.command_table(parser)


def test_writing_the_tables_keeps_the_prose_around_them():
    document = f"# Title\n\nby hand\n\n{config_doc.BEGIN}\nold tables\n{config_doc.END}\n\nmore by hand\n"
    written = config_doc.splice(document, "## ddml-x\n")
    assert written == f"# Title\n\nby hand\n\n{config_doc.BEGIN}\n\n## ddml-x\n\n{config_doc.END}\n\nmore by hand\n"
    with pytest.raises(ValueError, match="markers"):
        config_doc.splice("# no markers\n", "## ddml-x\n")


def _anchors(path: Path) -> set[str]:
    """GitHub's anchors for a Markdown file's headings: lower case, punctuation dropped, spaces to '-'."""
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.MULTILINE | re.DOTALL)
    headings = re.findall(r"^#{1,6} (.+)$", text, flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-") for heading in headings}


@pytest.mark.parametrize("document", DOCS, ids=lambda path: str(path.relative_to(REPO)))
def test_every_relative_link_lands_on_a_file_and_anchor_that_exist(document):
    text = re.sub(r"^```.*?^```", "", document.read_text(), flags=re.MULTILINE | re.DOTALL)
    broken = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):
            continue  # http(s):, mailto:
        path, _, anchor = target.partition("#")
        landing = (document.parent / path).resolve() if path else document
        if not landing.exists() or (anchor and landing.suffix == ".md" and anchor not in _anchors(landing)):
            broken.append(target)
    assert broken == []
