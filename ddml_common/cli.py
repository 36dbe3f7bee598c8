"""Command-line plumbing shared by ddml-broker, ddml-worker, ddml-gateway and ddml-status.

Every flag can come from three places; the later wins:

1. a TOML file (--config, or DDML_<ROLE>_CONFIG / DDML_CONFIG), in the command's table
   ([broker], [worker], [gateway] or [status]), keys named like the flags;
2. the environment: DDML_<ROLE>_<FLAG> (DDML_WORKER_BROKER), else DDML_<FLAG> (DDML_BROKER).
   The plain form is read by every command that has the flag, so in an environment shared by
   several commands it suits only flags that mean the same to each; AMBIGUOUS_FLAGS lists
   those that do not. An empty variable counts as unset;
3. the command line.

A bad value from any of the three (not a number, out of range, not one of the choices, a TOML
value of the wrong type) ends the command with one line that names the flag, where the value
came from and what was expected, and exit status 2. Each --help line names its variables and
its default. Logs are text or JSON lines (--log-format json).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import signal
import sys
import textwrap
import threading
from importlib import metadata

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

_FALLBACK_VERSION = "0.1.0"  # a source tree that was never installed; tests keep it equal to pyproject's
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})
_ENDPOINT_SCHEMES = ("tcp://", "ipc://", "inproc://")

# Flags that more than one command has, with a different meaning to each: set them per role
# (DDML_WORKER_BROKER, DDML_GATEWAY_BROKER) where one environment configures several commands.
# Every other shared flag (--heartbeat-interval-ms, --liveness, --curve-server-key, --log-level,
# --log-format, --config) means the same to each command that has it.
AMBIGUOUS_FLAGS = {
    "broker": "the broker's backend to ddml-worker, its frontend to ddml-gateway and ddml-status",
    "curve_secret_key": "each command's own secret key",
    "output": "an exported model's declared output tensor to ddml-worker, the output format to ddml-status",
}


def version() -> str:
    try:
        return metadata.version("ddml")
    except metadata.PackageNotFoundError:
        return _FALLBACK_VERSION


def env_names(section: str, dest: str) -> tuple[str, str]:
    """The variables for one flag, the one that wins first: DDML_<ROLE>_<FLAG>, DDML_<FLAG>."""
    return f"DDML_{section.upper()}_{dest.upper()}", f"DDML_{dest.upper()}"


class Number:
    """An argparse type: an int, or a finite float, within bounds. Also takes TOML's numbers."""

    def __init__(self, kind: type, minimum: float | None = None, maximum: float | None = None,
                 above: float | None = None):
        self.kind, self.minimum, self.maximum, self.above = kind, minimum, maximum, above
        self.__name__ = kind.__name__  # argparse names a type by it

    @property
    def expected(self) -> str:
        bounds = [f">= {self.minimum:g}" if self.minimum is not None else "",
                  f"> {self.above:g}" if self.above is not None else "",
                  f"<= {self.maximum:g}" if self.maximum is not None else ""]
        what = "an integer" if self.kind is int else "a number"
        return " ".join([what, " and ".join(b for b in bounds if b)]).strip()

    def __call__(self, raw):
        if isinstance(raw, bool) or not isinstance(raw, (str, int, float)):
            raise ValueError(raw)
        if self.kind is int and isinstance(raw, float):
            raise ValueError(raw)  # TOML 2.0 for an integer flag
        value = self.kind(raw.strip() if isinstance(raw, str) else raw)
        if not math.isfinite(value):
            raise ValueError(raw)
        if ((self.minimum is not None and value < self.minimum) or (self.maximum is not None and value > self.maximum)
                or (self.above is not None and value <= self.above)):
            raise ValueError(raw)
        return value


def endpoints(raw: str) -> str:
    """An argparse type: one ZeroMQ endpoint, or several joined by commas."""
    parts = [part.strip() for part in raw.split(",")] if isinstance(raw, str) else []
    if not parts or not all(p.startswith(_ENDPOINT_SCHEMES) and len(p) > p.index("//") + 2 for p in parts):
        raise ValueError(raw)
    return ",".join(parts)


def endpoint(raw: str) -> str:
    """An argparse type: one ZeroMQ endpoint."""
    if "," in str(raw):
        raise ValueError(raw)
    return endpoints(raw)


endpoints.expected = ("ZeroMQ endpoints such as tcp://HOST:PORT, ipc://PATH or inproc://NAME, "  # type: ignore[attr-defined]
                      "joined by commas")
endpoint.expected = "a ZeroMQ endpoint such as tcp://HOST:PORT, ipc://PATH or inproc://NAME"  # type: ignore[attr-defined]


def _expected(action: argparse.Action) -> str:
    if _is_switch(action):
        return "true or false: 1/0, true/false, yes/no, on/off"
    kind = action.type or str
    if kind is str:
        return "a string"
    return getattr(_number(kind), "expected", None) or f"a valid {getattr(kind, '__name__', 'value')}"


def _number(kind):
    return Number(kind) if kind in (int, float) else kind


def _is_switch(action: argparse.Action) -> bool:
    return isinstance(action, argparse._StoreConstAction) and isinstance(action.const, bool)


class Parser(argparse.ArgumentParser):
    def __init__(self, prog: str, description: str, section: str | None = None):
        # allow_abbrev=False: a flag means only itself (argparse would read --pool as --pooling).
        super().__init__(prog=prog, description=description, formatter_class=argparse.RawDescriptionHelpFormatter,
                         allow_abbrev=False)
        self.section = section or prog.removeprefix("ddml-")  # the TOML table, and the role in variable names
        self.add_argument("--version", action="version", version=f"{prog} {version()}")
        self.add_argument("--config", default=None,
                          help=f"TOML file; its [{self.section}] table sets flags (env and command line win)")
        self.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                          help="logging level")
        self.add_argument("--log-format", default="text", choices=["text", "json"],
                          help="text, or JSON lines carrying request_id / batch_id / worker_id where they apply")

    def settable_actions(self) -> dict[str, argparse.Action]:
        """The flags a file or the environment may set, by dest."""
        return {a.dest: a for a in self._actions
                if a.option_strings and not isinstance(a, (argparse._HelpAction, argparse._VersionAction))}

    def parse_args(self, args=None, namespace=None):  # type: ignore[override]
        argv = sys.argv[1:] if args is None else list(args)
        if not {"-h", "--help", "--version"} & set(argv):  # those show the built-in defaults, whatever is set
            actions = self.settable_actions()
            config_file = _flag_value(argv, "--config") or self._env_value("config")[1]
            if config_file:
                for key, raw in self._read_config(config_file).items():
                    dest = key.replace("-", "_")
                    if dest not in actions or dest == "config":
                        self.fail(f"{config_file}: [{self.section}] has unknown setting {key!r}")
                    self._set_default(actions[dest], raw, f"{config_file} [{self.section}] {key}")
            for dest, action in actions.items():
                name, raw = self._env_value(dest)
                if raw is not None:
                    self._set_default(action, raw, f"environment {name}")
        return super().parse_args(argv, namespace)

    def fail(self, message: str) -> None:
        """End the command with one line on stderr and exit status 2 (argparse's, for usage errors)."""
        self.exit(2, f"{self.prog}: {message}\n")

    def error(self, message: str) -> None:  # argparse's own errors (unknown flag, missing value): one line too
        self.fail(f"{message} (see {self.prog} --help)")

    def _env_value(self, dest: str) -> tuple[str, str | None]:
        for name in env_names(self.section, dest):
            value = os.environ.get(name)
            if value:  # empty counts as unset
                return name, value
        return "", None

    def _set_default(self, action: argparse.Action, raw, source: str) -> None:
        action.default = self._convert(action, raw, source)
        action.required = False

    def _get_value(self, action: argparse.Action, arg_string: str):  # argparse converts command-line values here
        return self._convert(action, arg_string, "the command line")

    def _convert(self, action: argparse.Action, raw, source: str):
        if _is_switch(action):
            value = raw if isinstance(raw, bool) else _switch(raw)
            ok = value is not None
        elif (action.type or str) is str:
            value, ok = raw, isinstance(raw, str)
        else:
            try:
                value, ok = _number(action.type)(raw), True
            except (TypeError, ValueError, argparse.ArgumentTypeError):
                value, ok = None, False
        expected = _expected(action)
        if ok and action.choices is not None and value not in action.choices:
            ok, expected = False, "one of: " + ", ".join(map(str, action.choices))
        if not ok:
            flag = max(action.option_strings, key=len)
            self.fail(f"invalid value for {flag} from {source}: {raw!r} (expected {expected})")
        return value

    def _read_config(self, path: str) -> dict:
        try:
            with open(path, "rb") as config_file:
                document = tomllib.load(config_file)
        except (OSError, tomllib.TOMLDecodeError) as error:
            self.fail(f"cannot read --config {path}: {error}")
        section = document.get(self.section, {})
        if not isinstance(section, dict):
            self.fail(f"{path}: [{self.section}] must be a table")
        return section

    def format_help(self) -> str:
        actions = self.settable_actions().values()
        saved = {action: action.help for action in actions}
        try:
            for action in actions:
                variables = " or ".join(env_names(self.section, action.dest))
                default = "" if action.default is None else f"; default: {action.default}"
                action.help = f"{action.help or ''} [env {variables}{default}]".replace("%", "%%")
            return super().format_help()
        finally:
            for action, text in saved.items():
                action.help = text

    def example_table(self) -> str:
        """This command's table for ddml.example.toml: every flag with its help and built-in default."""
        lines = [f"[{self.section}]"]
        actions = self.settable_actions()
        common = [actions.pop(dest) for dest in ("config", "log_level", "log_format")][1:]  # theirs first, then these
        for action in [*actions.values(), *common]:
            key = max(action.option_strings, key=len).removeprefix("--")
            help_text = " ".join((action.help or "").replace("%%", "%").split())
            if action.choices is not None:
                help_text += f" ({', '.join(map(str, action.choices))})"
            lines += textwrap.wrap(help_text, 98, initial_indent="# ", subsequent_indent="# ")
            lines.append(f"# {key} = \"...\"" if action.default is None else f"{key} = {_toml(action.default)}")
        return "\n".join(lines) + "\n"


def _switch(raw) -> bool | None:
    text = str(raw).strip().lower()
    return True if text in _TRUE else False if text in _FALSE else None


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))  # a TOML basic string: JSON's escapes are TOML's


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


def stop_on_signals(stop: threading.Event, signums=(signal.SIGTERM, signal.SIGINT)) -> None:
    """Set `stop` on SIGTERM or SIGINT, safely when a second signal comes during the first.

    Python runs a handler in the main thread between bytecodes, and can run the next one inside
    it. Event.set() takes a lock, so a second SIGTERM that lands while the first handler holds
    that lock runs a handler that waits for it for ever: the process then ignores every later
    SIGTERM too. (Seen in CI: a test sent SIGTERM twice, a moment apart.) Only the first signal
    calls set(); a handler nested in it, or any later one, returns at once.

    The first handler may still run while the main thread holds that lock itself, and wait for
    it for ever: so the main thread must only read stop.is_set() (which takes no lock), never
    call stop.wait(). Other threads may wait on it.
    """
    seen: list[int] = []

    def handle(signum, frame) -> None:
        if seen:
            return
        seen.append(signum)
        stop.set()

    for signum in signums:
        signal.signal(signum, handle)
