"""Flags, variables and config files: role-scoped variables, one-line errors, --version, the example file."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from ddml_common import cli
from tests.processes import REPO

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib


def parsers() -> dict:
    from broker.__main__ import build_parser as broker_parser
    from gateway.config import build_parser as gateway_parser
    from gateway.status_cli import build_parser as status_parser
    from worker.__main__ import build_parser as worker_parser

    return {"broker": broker_parser, "worker": worker_parser, "gateway": gateway_parser, "status": status_parser}


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    """No DDML_* variable of the shell running the tests leaks in."""
    import os

    for name in list(os.environ):
        if name.startswith("DDML_"):
            monkeypatch.delenv(name)


def parse(role: str, *argv: str):
    return parsers()[role]().parse_args(list(argv))


def one_line_error(capsys, role: str, *argv: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        parse(role, *argv)
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    return lines[0]


def test_a_role_scoped_variable_wins_over_the_plain_one_and_each_role_reads_its_own(monkeypatch):
    monkeypatch.setenv("DDML_BROKER", "tcp://shared:1")
    assert parse("worker").broker == parse("gateway").broker == "tcp://shared:1"  # plain: where unambiguous
    monkeypatch.setenv("DDML_WORKER_BROKER", "tcp://broker:5556")
    monkeypatch.setenv("DDML_GATEWAY_BROKER", "tcp://broker:5555")
    assert parse("worker").broker == "tcp://broker:5556"
    assert parse("gateway").broker == "tcp://broker:5555"
    assert parse("status").broker == "tcp://shared:1"
    assert parse("gateway", "--broker", "tcp://flag:1").broker == "tcp://flag:1"  # the command line wins


def test_an_empty_variable_counts_as_unset(monkeypatch):
    monkeypatch.setenv("DDML_GATEWAY_API_KEY_FILE", "")
    monkeypatch.setenv("DDML_MAX_QUEUE", "")
    assert parse("gateway").api_key_file is None
    assert parse("broker").max_queue == 10_000


def test_switches_read_true_and_false_from_the_environment_and_the_file(monkeypatch, tmp_path):
    monkeypatch.setenv("DDML_GATEWAY_PRELOAD", "yes")
    assert parse("gateway").preload is True
    monkeypatch.setenv("DDML_GATEWAY_PRELOAD", "0")
    assert parse("gateway").preload is False
    config = tmp_path / "ddml.toml"
    config.write_text("[gateway]\npreload = true\n")
    monkeypatch.delenv("DDML_GATEWAY_PRELOAD")
    assert parse("gateway", "--config", str(config)).preload is True


def test_file_then_environment_then_flags(monkeypatch, tmp_path):
    config = tmp_path / "ddml.toml"
    config.write_text('[broker]\nmax-queue = 7\nliveness = 9\nmax_wait_ms = 2.5\n[worker]\nmodel = "x"\n')
    monkeypatch.setenv("DDML_CONFIG", str(config))
    monkeypatch.setenv("DDML_BROKER_LIVENESS", "4")
    args = parse("broker", "--max-wait-ms", "1")
    assert (args.max_queue, args.liveness, args.max_wait_ms) == (7, 4, 1.0)


@pytest.mark.parametrize("role, argv, env, toml, line", [
    ("broker", [], {"DDML_MAX_QUEUE": "abc"}, None,
     "ddml-broker: invalid value for --max-queue from environment DDML_MAX_QUEUE: 'abc' (expected an integer >= 1)"),
    ("broker", [], {"DDML_BROKER_MAX_QUEUE": "0"}, None,
     "ddml-broker: invalid value for --max-queue from environment DDML_BROKER_MAX_QUEUE: '0' "
     "(expected an integer >= 1)"),
    ("broker", ["--max-queue", "abc"], {}, None,
     "ddml-broker: invalid value for --max-queue from the command line: 'abc' (expected an integer >= 1)"),
    ("broker", [], {}, '[broker]\nmax-queue = "abc"\n',
     "ddml-broker: invalid value for --max-queue from {file} [broker] max-queue: 'abc' (expected an integer >= 1)"),
    ("broker", [], {}, "[broker]\nliveness = 2.5\n",
     "ddml-broker: invalid value for --liveness from {file} [broker] liveness: 2.5 (expected an integer >= 1)"),
    ("broker", [], {}, "[broker]\nmax-wait-ms = true\n",
     "ddml-broker: invalid value for --max-wait-ms from {file} [broker] max-wait-ms: True (expected a number >= 0)"),
    ("broker", ["--max-wait-ms", "nan"], {}, None,
     "ddml-broker: invalid value for --max-wait-ms from the command line: 'nan' (expected a number >= 0)"),
    ("broker", ["--metrics-port", "70000"], {}, None,
     "ddml-broker: invalid value for --metrics-port from the command line: '70000' "
     "(expected an integer >= 0 and <= 65535)"),
    ("broker", ["--frontend", "localhost:5555"], {}, None,
     "ddml-broker: invalid value for --frontend from the command line: 'localhost:5555' "
     "(expected a ZeroMQ endpoint such as tcp://HOST:PORT, ipc://PATH or inproc://NAME)"),
    ("broker", [], {"DDML_LOG_FORMAT": "xml"}, None,
     "ddml-broker: invalid value for --log-format from environment DDML_LOG_FORMAT: 'xml' "
     "(expected one of: text, json)"),
    ("worker", [], {}, '[worker]\ntask = "translate"\n',
     "ddml-worker: invalid value for --task from {file} [worker] task: 'translate' (expected one of: {tasks})"),
    ("worker", [], {}, "[worker]\nbroker = 5556\n",
     "ddml-worker: invalid value for --broker from {file} [worker] broker: 5556 (expected ZeroMQ endpoints such as tcp://HOST:PORT, ipc://PATH or inproc://NAME, joined by commas)"),
    ("worker", [], {"DDML_WORKER_SUPERVISE": "maybe"}, None,
     "ddml-worker: invalid value for --supervise from environment DDML_WORKER_SUPERVISE: 'maybe' "
     "(expected true or false: 1/0, true/false, yes/no, on/off)"),
    ("gateway", [], {"DDML_MAX_REQUEST_TIMEOUT_MS": "soon"}, None,
     "ddml-gateway: invalid value for --max-request-timeout-ms from environment DDML_MAX_REQUEST_TIMEOUT_MS: "
     "'soon' (expected a number > 0)"),
    ("gateway", [], {"DDML_GATEWAY_WORKERS": "-1"}, None,
     "ddml-gateway: invalid value for --workers from environment DDML_GATEWAY_WORKERS: '-1' "
     "(expected an integer >= 0)"),
    ("status", ["-o", "yaml"], {}, None,
     "ddml-status: invalid value for --output from the command line: 'yaml' (expected one of: table, json)"),
    ("broker", ["--no-such-flag"], {}, None,
     "ddml-broker: unrecognized arguments: --no-such-flag (see ddml-broker --help)"),
    ("broker", [], {}, "[broker]\nno-such-flag = 1\n", "ddml-broker: {file}: [broker] has unknown setting 'no-such-flag'"),
    ("broker", [], {}, "[broker\n", "ddml-broker: cannot read --config {file}: "),
])
def test_a_bad_value_from_any_source_ends_with_one_line_naming_it_and_exit_2(
        capsys, monkeypatch, tmp_path, role, argv, env, toml, line):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    config = tmp_path / "ddml.toml"
    if toml is not None:
        config.write_text(toml)
        argv = [*argv, "--config", str(config)]
    tasks = next(a for a in parsers()["worker"]()._actions if a.dest == "task").choices
    expected = line.format(file=config, tasks=", ".join(tasks))
    assert one_line_error(capsys, role, *argv).startswith(expected)


def main_of(module: str):
    import importlib

    return importlib.import_module(module if module.endswith("status_cli") else f"{module}.__main__").main


@pytest.mark.parametrize("module, argv, line", [
    ("broker", ["--stall-timeout-s", "0.5"],
     "ddml-broker: --stall-timeout-s (0.5) must exceed the heartbeat interval (1 s): an idle loop passes once "
     "per interval"),
    ("broker", ["--curve-secret-key", "broker.key_secret"],
     "ddml-broker: --curve-secret-key needs --authorized-workers and --authorized-clients"),
    ("worker", ["--max-batch-size", "0"], "ddml-worker: invalid configuration: max_batch_size must be from 1 to 65536, got 0"),
    ("worker", ["--model", "x", "--handler", "tests.handlers:Nope"],
     "ddml-worker: --handler tests.handlers:Nope: module 'tests.handlers' has no attribute 'Nope'"),
    ("worker", ["--model", "x", "--model-path", "/no/such/model"],
     "ddml-worker: --model-path /no/such/model: not a directory"),
    ("worker", ["--model", "foo"],
     "ddml-worker: --model foo: not built in (minilm, echo): give --model-path DIR or --handler module:Class"),
    ("worker", ["--model", "x", "--model-path", "no-such-org/no-such-model"],
     "ddml-worker: cannot load model 'x': 'no-such-org/no-such-model' is not a local directory, and no Hugging "
     "Face model of that id could be found (...)"),  # (...): the hub library's own reason, which varies
    ("gateway", ["--api-key-file", "/dev/null"], "ddml-gateway: --api-key-file /dev/null: /dev/null holds no tokens"),
    ("gateway", ["--api-key-file", "/no/such/tokens"],
     "ddml-gateway: --api-key-file /no/such/tokens: No such file or directory"),
    ("gateway", ["--certfile", "cert.pem"], "ddml-gateway: --certfile and --keyfile go together"),
    ("gateway.status_cli", ["--curve-server-key", "broker.key"],
     "ddml-status: invalid configuration: CURVE needs both --curve-server-key and --curve-secret-key"),
])
def test_each_command_ends_a_bad_configuration_with_one_line_and_exit_2(capsys, monkeypatch, module, argv, line):
    import importlib

    entry = importlib.import_module(module if module.endswith("status_cli") else f"{module}.__main__")
    if hasattr(entry, "configure_logging"):
        monkeypatch.setattr(entry, "configure_logging", lambda *args: None)  # leave the test run's logging alone
    if hasattr(entry, "stop_on_signals"):  # and its signals: a SIGTERM handler left in the test process made the
        monkeypatch.setattr(entry, "stop_on_signals", lambda *args: None)  # simulator's forked pool ignore terminate()
    with pytest.raises(SystemExit) as exit_info:
        main_of(module)(argv)
    assert exit_info.value.code == 2
    [printed] = capsys.readouterr().err.splitlines()
    if line.endswith(" (...)"):
        assert printed.startswith(line.removesuffix("(...)") + "("), printed
    else:
        assert printed == line


def test_a_real_process_prints_the_line_alone_with_no_traceback():
    result = subprocess.run([sys.executable, "-m", "broker", "--max-queue", "abc"], cwd=REPO, capture_output=True,
                            text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})
    assert (result.returncode, result.stdout) == (2, "")
    assert result.stderr == ("ddml-broker: invalid value for --max-queue from the command line: 'abc' "
                             "(expected an integer >= 1)\n")


@pytest.mark.parametrize("module, flag, meant", [
    ("broker", "--max-q", "--max-queue"), ("worker", "--model-p", "--model-path"),
    ("gateway", "--api-key", "--api-key-file"), ("gateway.status_cli", "--interval", "--interval-s"),
    ("ddml_common.keys", "--vers", "--version"),
])
def test_a_flag_means_only_itself_never_a_longer_one_it_begins(capsys, module, flag, meant):
    """argparse's prefix matching read `ddml-worker --pool` as `--pooling` (before --pool existed): it is off
    on every command."""
    main = main_of(module) if module != "ddml_common.keys" else __import__(module, fromlist=["main"]).main
    with pytest.raises(SystemExit) as exit_info:
        main([flag, "1"] if module != "ddml_common.keys" else [flag, "generate", "/nonexistent", "name"])
    assert exit_info.value.code == 2
    line = capsys.readouterr().err.splitlines()[-1]  # ddml-keys prints argparse's usage line first
    assert f"unrecognized arguments: {flag}" in line and meant not in line, line


@pytest.mark.parametrize("command, module", [
    ("ddml-broker", "broker"), ("ddml-worker", "worker"), ("ddml-gateway", "gateway"),
    ("ddml-status", "gateway.status_cli"), ("ddml-keys", "ddml_common.keys"),
])
def test_every_command_answers_version(capsys, command, module):
    with pytest.raises(SystemExit) as exit_info:
        (main_of(module) if module != "ddml_common.keys" else __import__(module, fromlist=["main"]).main)(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"{command} {cli.version()}"


def test_the_fallback_version_is_the_projects():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert cli._FALLBACK_VERSION == project["version"]


@pytest.mark.parametrize("role", ["broker", "worker", "gateway", "status"])
def test_help_lists_every_flag_with_its_variables(role):
    parser = parsers()[role]()
    text = " ".join(parser.format_help().split()).replace("- ", "-")  # argparse may wrap at a hyphen
    for dest, action in parser.settable_actions().items():
        assert max(action.option_strings, key=len) in text
        scoped, plain = cli.env_names(role, dest)
        assert f"{scoped} or {plain}" in text, dest


def test_no_role_reads_a_ddml_variable_except_through_its_flags():
    reads = re.compile(r"""environ(\.get)?\s*[(\[]\s*["']DDML_|getenv\(\s*["']DDML_""")
    offenders = [f"{path.relative_to(REPO)}:{number}"
                 for package in ("broker", "worker", "gateway")
                 for path in (REPO / package).rglob("*.py")
                 for number, text in enumerate(path.read_text().splitlines(), 1) if reads.search(text)]
    assert offenders == []


def test_flags_shared_by_several_commands_mean_the_same_unless_listed_as_ambiguous():
    same_meaning = {"config", "log_level", "log_format", "heartbeat_interval_ms", "liveness", "curve_server_key",
                    "otlp_endpoint"}
    owners: dict[str, set[str]] = {}
    for role, build in parsers().items():
        for dest in build().settable_actions():
            owners.setdefault(dest, set()).add(role)
    shared = {dest for dest, roles in owners.items() if len(roles) > 1}
    assert shared - same_meaning == set(cli.AMBIGUOUS_FLAGS)


def example_entries(section_text: str) -> dict[str, object]:
    """The keys of one table of ddml.example.toml: set ones with their values, commented-out ones as None."""
    entries: dict[str, object] = dict(tomllib.loads(section_text).popitem()[1])
    for key in re.findall(r'^# ([a-z][a-z0-9-]*) = "\.\.\."$', section_text, flags=re.MULTILINE):
        entries[key] = None
    return entries


def test_the_example_file_has_every_flag_with_its_built_in_default():
    text = (REPO / "ddml.example.toml").read_text()
    tables = dict(re.findall(r"^\[(\w+)\]\n(.*?)(?=^\[|\Z)", text, flags=re.MULTILINE | re.DOTALL))
    assert set(tables) == set(parsers())
    stale = "ddml.example.toml is stale: run .venv/bin/python scripts/example_config.py"
    for role, build in parsers().items():
        parser = build()
        expected = {max(a.option_strings, key=len)[2:]: a.default
                    for dest, a in parser.settable_actions().items() if dest != "config"}
        assert example_entries(f"[{role}]\n" + tables[role]) == expected, stale
        from_file = vars(parser.parse_args(["--config", str(REPO / "ddml.example.toml")]))
        assert {**from_file, "config": None} == vars(parser.parse_args([]))


def test_the_gateway_hands_every_flag_to_gunicorns_processes_unchanged(monkeypatch, tmp_path):
    import os

    from gateway import __main__ as gateway_main
    from gateway.config import build_parser

    monkeypatch.setattr(os, "environ", dict(os.environ))  # main() writes DDML_GATEWAY_* for gunicorn to read
    monkeypatch.setattr(os, "execv", lambda *command: None)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(tmp_path)
    os.environ["DDML_MAX_INPUTS"] = "7"  # a plain variable, read here once
    argv = ["--broker", "tcp://10.0.0.1:5555", "--workers", "3", "--max-request-timeout-ms", "60000",
            "--preload", "--log-format", "json"]
    expected = build_parser().parse_args(argv)
    gateway_main.main(argv)
    assert os.environ["DDML_GATEWAY_BROKER"] == "tcp://10.0.0.1:5555"
    assert os.environ["DDML_GATEWAY_MAX_INPUTS"] == "7"
    assert build_parser().parse_args([]) == expected


def test_gunicorn_waits_for_the_longest_request_deadline_and_takes_every_setting_from_the_flags():
    code = ("import json, gateway.gunicorn_conf as c; print(json.dumps([c.graceful_timeout, c.timeout, c.workers, "
            "c.bind, c.preload_app]))")
    env = {"PATH": "/usr/bin:/bin", "DDML_GATEWAY_MAX_REQUEST_TIMEOUT_MS": "12500", "DDML_WORKERS": "3",
           "DDML_GATEWAY_WORKER_TIMEOUT_S": "60", "DDML_THREADS": "16", "DDML_BIND": "0.0.0.0:9000",
           "DDML_GATEWAY_PRELOAD": "true"}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60,
                            env=env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [18, 60, 3, "0.0.0.0:9000", True]  # 12.5 s + 5 s margin, rounded up
    env["DDML_GRACEFUL_TIMEOUT_S"] = "7"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60,
                            env=env)
    assert json.loads(result.stdout)[0] == 7


def test_status_json_is_the_brokers_status_with_a_rate_per_worker():
    from gateway.status_cli import render_json

    worker = {"worker_id": "ab", "host": "h", "pid": 1, "device": "cpu", "models": ["echo"], "state": "idle",
              "in_flight_items": 0, "batches": 30, "p50_batch_latency_ms": 1.5, "last_heartbeat_age_s": 0.2}
    status = {"instance_id": "i1", "models": {"echo": {"workers": 1}}, "workers": [worker], "stats": {"requests": 3}}
    previous = {**status, "workers": [{**worker, "batches": 10}]}
    document = json.loads(render_json(status, previous, elapsed_s=2.0))
    assert document["workers"][0]["batches_per_s"] == 10.0
    assert {k: v for k, v in document.items() if k != "workers"} == {k: v for k, v in status.items() if k != "workers"}
    assert json.loads(render_json(status, None, 0.0))["workers"][0]["batches_per_s"] == 0.0


# A second SIGTERM while the first handler holds the stop Event's lock: CI once saw a worker hang
# for ever there. The script forces that moment: its Event raises SIGTERM inside set(), under the
# lock, and raise_signal() runs the handler at once, nested in the first.
_NESTED_SIGNAL_SCRIPT = """
import signal, threading
from ddml_common.cli import stop_on_signals

class SecondSignalUnderTheLock(threading.Event):
    def set(self):
        with self._cond:
            if not getattr(self, "raised", False):
                self.raised = True
                signal.raise_signal(signal.SIGTERM)
            self._flag = True
            self._cond.notify_all()

stop = SecondSignalUnderTheLock()
stop_on_signals(stop)
signal.raise_signal(signal.SIGTERM)
print("stopped" if stop.wait(5) else "not stopped")
"""


def test_a_signal_inside_the_stop_handler_neither_deadlocks_nor_is_lost():
    done = subprocess.run([sys.executable, "-c", _NESTED_SIGNAL_SCRIPT], cwd=REPO, capture_output=True,
                          text=True, timeout=20)
    assert (done.returncode, done.stdout.strip()) == (0, "stopped"), done.stderr
