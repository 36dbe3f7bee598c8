"""Command-line plumbing shared by ddml-broker, ddml-worker and ddml-gateway.

Every flag --some-flag can also come from the environment variable DDML_SOME_FLAG; a flag
given on the command line wins. Each --help line names its variable and its default.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

_TRUE = {"1", "true", "yes", "on"}


def env_name(dest: str) -> str:
    return "DDML_" + dest.upper()


class Parser(argparse.ArgumentParser):
    def __init__(self, prog: str, description: str):
        super().__init__(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
        self.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                          help="logging level")

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        for action in self._actions:
            if not action.option_strings or action.dest == "help":
                continue
            value = os.environ.get(env_name(action.dest))
            if value is None:
                continue
            if isinstance(action, argparse._StoreTrueAction):
                action.default = value.strip().lower() in _TRUE
            else:
                action.default = action.type(value) if action.type else value
            action.required = False
        return super().parse_args(args, namespace)

    def format_help(self) -> str:
        for action in self._actions:
            if action.option_strings and action.dest != "help" and "[env " not in (action.help or ""):
                default = "" if action.default is None else f"; default: {action.default}"
                action.help = f"{action.help or ''} [env {env_name(action.dest)}{default}]".replace("%", "%%")
        return super().format_help()


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s",
    )
