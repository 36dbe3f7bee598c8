"""Write ddml.example.toml from the commands' own flags, so that it always shows the real defaults.

    .venv/bin/python scripts/example_config.py    # rewrite ddml.example.toml

tests/unit/test_cli_config.py fails, and says to run this, when a flag or a default changes.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "ddml.example.toml"

HEADER = """\
# ddml configuration: every flag of every command, by its flag name, in the command's table, with
# its built-in default. A flag whose default is empty is commented out. Written by
# scripts/example_config.py from the commands themselves; edit the flags, not this file.
#
# Use with --config ddml.toml (or DDML_CONFIG=ddml.toml). Environment variables and command-line
# flags override what is here: DDML_<ROLE>_<FLAG> (DDML_WORKER_BROKER), else DDML_<FLAG>.
# `ddml-<command> --help` lists every flag with its variables.
"""


def parsers() -> dict:
    """Each command's build_parser, by its table (broker, worker, gateway, status), in that order.
    scripts/config_doc.py writes docs/configuration.md from the same list."""
    sys.path.insert(0, str(REPO))
    from broker.__main__ import build_parser as broker_parser
    from gateway.config import build_parser as gateway_parser
    from gateway.status_cli import build_parser as status_parser
    from worker.__main__ import build_parser as worker_parser

    return {"broker": broker_parser, "worker": worker_parser, "gateway": gateway_parser, "status": status_parser}


def render() -> str:
    tables = [build().example_table() for build in parsers().values()]
    return HEADER + "\n" + "\n".join(tables)


if __name__ == "__main__":
    EXAMPLE.write_text(render())
