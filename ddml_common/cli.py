"""Command-line plumbing shared by ddml-broker, ddml-worker, ddml-gateway and ddml-status.

Every flag can come from three places; the later wins: a TOML file (--config, or DDML_CONFIG),
section [broker], [worker], [gateway] or [status], keys named like the flags; then the
environment variable DDML_<FLAG>; then the command line. Each --help line names its variable
and its default. Logs are text or JSON lines (--log-format json).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

_TRUE = {"1", "true", "yes", "on"}


def env_name(dest: str) -> str:
    return "DDML_" + dest.upper()


class Parser(argparse.ArgumentParser):
    def __init__(self, prog: str, description: str, section: str | None = None):
        super().__init__(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
        self.section = section or prog.removeprefix("ddml-")  # the TOML table this command reads
        self.add_argument("--config", default=None,
                          help=f"TOML file; its [{self.section}] table sets flags (env and command line win)")
        self.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                          help="logging level")
        self.add_argument("--log-format", default="text", choices=["text", "json"],
                          help="text, or JSON lines carrying request_id / batch_id / worker_id where they apply")

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        argv = sys.argv[1:] if args is None else list(args)
        actions = {a.dest: a for a in self._actions if a.option_strings and a.dest != "help"}
        config_file = _flag_value(argv, "--config") or os.environ.get(env_name("config"))
        if config_file:
            for key, value in self._read_config(config_file).items():
                dest = key.replace("-", "_")
                if dest not in actions or dest == "config":
                    self.error(f"{config_file}: [{self.section}] has unknown setting {key!r}")
                actions[dest].default = value
                actions[dest].required = False
        for dest, action in actions.items():
            value = os.environ.get(env_name(dest))
            if value is None:
                continue
            if isinstance(action, argparse._StoreTrueAction):
                action.default = value.strip().lower() in _TRUE
            else:
                action.default = action.type(value) if action.type else value
            action.required = False
        return super().parse_args(argv, namespace)

    def _read_config(self, path: str) -> dict:
        try:
            with open(path, "rb") as config_file:
                document = tomllib.load(config_file)
        except (OSError, tomllib.TOMLDecodeError) as error:
            self.error(f"cannot read --config {path}: {error}")
        section = document.get(self.section, {})
        if not isinstance(section, dict):
            self.error(f"{path}: [{self.section}] must be a table")
        return section

    def format_help(self) -> str:
        for action in self._actions:
            if action.option_strings and action.dest != "help" and "[env " not in (action.help or ""):
                default = "" if action.default is None else f"; default: {action.default}"
                action.help = f"{action.help or ''} [env {env_name(action.dest)}{default}]".replace("%", "%%")
        return super().format_help()


def _flag_value(argv: list[str], flag: str) -> str | None:
    for index, arg in enumerate(argv):
        if arg == flag and index + 1 < len(argv):
            return argv[index + 1]
        if arg.startswith(flag + "="):
            return arg.split("=", 1)[1]
    return None


CONTEXT_FIELDS = ("request_id", "batch_id", "worker_id", "model")  # passed as logging `extra=`


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with the ids a line concerns as fields of their own."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}",
            "level": record.levelname,
            "logger": record.name,
            "process": record.processName,
            "message": record.getMessage(),
        }
        for name in CONTEXT_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                entry[name] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    """The classic line, then the ids it concerns that its message does not name already, as in
    `[request_id=abc/12-3 batch_id=7]`: text logs can be searched by id, as JSON logs can."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        line = super().formatMessage(record)
        ids = [f"{name}={value}" for name in CONTEXT_FIELDS
               if (value := getattr(record, name, None)) is not None and str(value) not in record.message]
        return f"{line} [{' '.join(ids)}]" if ids else line


def configure_logging(level: str, log_format: str = "text") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(TextFormatter("%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)
