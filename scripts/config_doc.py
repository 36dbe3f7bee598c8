"""Write the flag tables of docs/configuration.md from the commands' own parsers, so that they never drift.

    .venv/bin/python scripts/config_doc.py    # rewrite the tables in docs/configuration.md

Only the text between the BEGIN and END markers is written; the prose around it is by hand.
tests/unit/test_docs.py fails, and says to run this, when a flag is added or removed, or its help,
choices or default change (as tests/unit/test_cli_config.py does for ddml.example.toml, which
scripts/example_config.py writes from the same parsers).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOC = REPO / "docs" / "configuration.md"
BEGIN = "<!-- BEGIN flag tables: written by scripts/config_doc.py from the commands' --help; edit the flags, not this -->"
END = "<!-- END flag tables -->"


def render() -> str:
    """Every command's table, in the order of ddml.example.toml: broker, worker, gateway, status."""
    sys.path.insert(0, str(REPO))
    from scripts.example_config import parsers

    return "\n".join(command_table(build()) for build in parsers().values())


def command_table(parser) -> str:
    """One command's section: its description, then a row per flag in --help's order."""
    from ddml_common.cli import env_names

    lines = [f"## {parser.prog}", "", f"{parser.description} Its table in a `--config` file is `[{parser.section}]`.",
             "", "| Flag | Default | Variables | Meaning |", "|---|---|---|---|"]
    for action in parser.settable_actions().values():
        flags = ", ".join(f"`{flag}`" for flag in action.option_strings)
        variables = ", ".join(f"`{name}`" for name in env_names(parser.section, action.dest))
        lines.append(f"| {flags} | {_default(action)} | {variables} | {_escape(_meaning(action))} |")
    return "\n".join(lines) + "\n"


def _default(action: argparse.Action) -> str:
    if action.default is None:
        return ""
    if isinstance(action.default, bool):  # a switch: the flag alone turns it on
        return "on" if action.default else "off"
    return f"`{action.default}`" if action.default != "" else '`""`'


def _meaning(action: argparse.Action) -> str:
    text = " ".join((action.help or "").replace("%%", "%").split())
    if action.choices is not None:
        text += f" (one of: {', '.join(map(str, action.choices))})"
    return text


def _escape(text: str) -> str:
    """A table cell: a `|` would end it, and `<` could open an HTML tag."""
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("<", "&lt;")


def splice(document: str, tables: str) -> str:
    """The document with the text between its markers replaced by `tables`."""
    head, begin, rest = document.partition(BEGIN)
    _, end, tail = rest.partition(END)
    if not begin or not end:
        raise ValueError(f"{DOC.relative_to(REPO)} lacks its markers {BEGIN!r} and {END!r}")
    return f"{head}{BEGIN}\n\n{tables}\n{END}{tail}"


if __name__ == "__main__":
    DOC.write_text(splice(DOC.read_text(), render()))
