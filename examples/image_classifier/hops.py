"""Where one request's time goes, hop by hop: perf_counter_ns stamps in every process, merged.

bench.py's `hops` command uses this; it is a measuring tool, not part of ddml. Nothing in ddml
imports it, and ddml's processes carry no stamps unless it is installed into them.

How: bench.py starts the broker, worker and gateway with a sitecustomize.py on their PYTHONPATH
that calls install(). install() wraps a list of functions (WRAPPED: ddml's own, uvicorn's, pyzmq's send and receive) as their modules are imported, so that each call leaves an
enter and an exit stamp: time.perf_counter_ns() (CLOCK_MONOTONIC on Linux: one clock for every
process of the host), the thread's CPU time, and for a zmq frame or a protocol message its kind
and size. Heartbeats and status messages are left out. Each process writes its stamps to
DDML_HOPS_DIR/<role>-<pid>.tsv; the bench process stamps each client call too.

analyse() cuts the merged stamps into the client's calls (one request at a time), keeps the calls
whose stamps came in the most common order (a heartbeat or a collection that fell inside a call
changes it), and prints each stamp's median time from the client's send, the step from the stamp
before, and the thread CPU time of that step where both stamps are from the same thread.
"""

from __future__ import annotations

import atexit
import functools
import importlib.abc
import inspect
import os
import statistics
import sys
import threading
import time
from collections import Counter
from pathlib import Path

# module -> attributes ("Class.method" or "function") wrapped with enter/exit stamps.
WRAPPED = {
    "uvicorn.protocols.http.httptools_impl": ["HttpToolsProtocol.on_headers_complete",
                                              "HttpToolsProtocol.on_message_complete",
                                              "RequestResponseCycle.run_asgi", "RequestResponseCycle.send"],
    "ddml_common.protocol": ["encode_value", "decode_value", "encode", "decode", "pack_document",
                             "unpack_document"],
    "gateway.resources": ["read_body", "parse_document", "write_document"],
    "gateway.tensors": ["check_v1_inputs", "check_v2_inputs"],
    "gateway.openinference": ["prepare", "_rows", "_output_tensors", "Infer._write"],
    "gateway.async_transport": ["AsyncBrokerClient.request"],
    "gateway.dealers": ["deliver"],
    "broker.core": ["BrokerCore.on_frames"],
    "worker.link": ["decode_batch"],
    "worker.loop": ["run_counted", "_predict", "_push"],
    "worker.connection": ["BrokerConnection._run_inline"],
    "worker.results": ["batch_result"],
    "zmq.sugar.socket": ["Socket.send", "Socket.recv", "Socket.recv_multipart"],
}
_KINDS = {3: "REQUEST", 4: "BATCH", 5: "RESULT", 6: "REPLY", 11: "REPLIES"}  # protocol.Kind: the request's path
_MESSAGES = {"Request", "Batch", "BatchResult", "Reply", "Replies"}
_FLUSH_EVERY = 512

_records: list[tuple] = []
_lock = threading.Lock()
_role: str | None = None  # this process's role: from its command line, known once it runs


def _frame_kind(data) -> tuple[str | None, int]:
    """(the request-path kind of a ddml frame, its size); (None, size) for anything else."""
    try:
        view = memoryview(data)
    except TypeError:
        return None, 0
    if view.nbytes > 5 and bytes(view[:4]) == b"DDML":
        return _KINDS.get(view[5]), view.nbytes
    return None, view.nbytes


def _about(name: str, args: tuple, result) -> str | None:
    """What a stamp says besides its name: the message kind and size, or None to leave the call out
    (a heartbeat, an identity frame)."""
    if name in ("Socket.send", "Socket.recv"):
        kind, size = _frame_kind(args[1] if name == "Socket.send" else result)
        return f"{kind} {size}" if kind else None
    if name == "Socket.recv_multipart":
        kind, size = _frame_kind(result[-1]) if result else (None, 0)
        return f"{kind} {size}" if kind else None
    if name == "decode":
        kind, size = _frame_kind(args[0][0]) if args and args[0] else (None, 0)
        return f"{kind} {size}" if kind else None
    if name == "encode":
        kind = type(args[0]).__name__
        return kind if kind in _MESSAGES else None
    if name == "BrokerCore.on_frames":
        kind, size = _frame_kind(args[3][-1]) if len(args) > 3 and args[3] else (None, 0)
        return f"{kind} {size}" if kind else None
    return ""


def _stamp(name: str, edge: str, about: str) -> None:
    record = (time.perf_counter_ns(), time.thread_time_ns(), threading.current_thread().name, name + edge, about)
    with _lock:
        _records.append(record)
        if len(_records) >= _FLUSH_EVERY:
            _flush_locked()


def _wrap(name: str, function):
    if inspect.iscoroutinefunction(function):
        @functools.wraps(function)
        async def wrapper(*args, **kwargs):
            started = time.perf_counter_ns(), time.thread_time_ns()
            result = await function(*args, **kwargs)
            _record(name, args, result, started)
            return result
    else:
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            started = time.perf_counter_ns(), time.thread_time_ns()
            result = function(*args, **kwargs)
            _record(name, args, result, started)
            return result
    wrapper.__hops_wrapped__ = True
    return wrapper


def _record(name: str, args: tuple, result, started: tuple[int, int]) -> None:
    """A call's enter stamp (taken when it started) and its exit stamp, unless _about() leaves it out."""
    about = _about(name, args, result)
    if about is not None:
        with _lock:
            _records.append((*started, threading.current_thread().name, name + ">", about))
        _stamp(name, "<", about)


def _patch(module) -> None:
    for dotted in WRAPPED.get(module.__name__, ()):
        owner, _, attribute = dotted.rpartition(".")
        holder = getattr(module, owner) if owner else module
        function = getattr(holder, attribute)
        if not getattr(function, "__hops_wrapped__", False):
            setattr(holder, attribute, _wrap(dotted, function))


class _Finder(importlib.abc.MetaPathFinder):
    """Wraps WRAPPED's functions right after their module runs, before anyone imports them by name."""

    def find_spec(self, fullname, path, target=None):
        if fullname not in WRAPPED:
            return None
        for finder in sys.meta_path:
            if finder is self:
                continue
            spec = getattr(finder, "find_spec", lambda *a: None)(fullname, path, target)
            if spec is not None:
                loader = spec.loader
                run = loader.exec_module

                def exec_module(module, run=run):
                    run(module)
                    _patch(module)

                loader.exec_module = exec_module
                return spec
        return None


def _flush_locked() -> None:
    directory = os.environ.get("DDML_HOPS_DIR")
    if directory and _records:
        role = _role or Path(sys.argv[0]).parent.name or "client"  # `python -m broker`: broker/__main__.py
        with open(Path(directory, f"{role}-{os.getpid()}.tsv"), "a") as out:
            out.writelines("\t".join(map(str, r)) + "\n" for r in _records)
    _records.clear()


def flush() -> None:
    with _lock:
        _flush_locked()


def install(role: str | None = None) -> None:
    """Stamp this process from now on (sitecustomize calls it, before anything is imported)."""
    global _role
    _role = role
    sys.meta_path.insert(0, _Finder())
    for name in WRAPPED:
        if name in sys.modules:
            _patch(sys.modules[name])
    os.register_at_fork(after_in_child=_records.clear)  # gunicorn's worker: its own stamps, not the master's
    atexit.register(flush)


def stamp(name: str, edge: str, about: str = "") -> None:
    """A stamp of the caller's own (the client's call: "client", ">" or "<", and the route)."""
    _stamp(name, edge, about)


# ---------------------------------------------------------------------------- analysis


def _load(directory: Path) -> list[tuple]:
    rows = []
    for path in directory.glob("*.tsv"):
        role = path.stem.rsplit("-", 1)[0]
        for line in path.read_text().splitlines():
            t, cpu, thread, name, about = line.split("\t")
            rows.append((int(t), int(cpu), role, thread, name, about))
    rows.sort()
    return rows


def analyse(directory: Path, title: str) -> str:
    """The table of one run's stamps for the client's calls labelled `title` (see the module's
    docstring), as Markdown."""
    rows = _load(directory)
    calls, current = [], None
    for row in rows:
        if row[2] == "client" and row[4] == "client>" and row[5] == title:
            current = [row]
        elif current is not None:
            current.append(row)
            if row[2] == "client" and row[4] == "client<":
                calls.append(current)
                current = None
    if not calls:
        return f"{title}: no complete calls stamped"

    def label(row) -> str:
        kind = row[5].split(" ")[0] if row[5] else ""
        return f"{row[2]}:{row[3] if row[2] == 'worker' else ''}:{row[4]}{' ' + kind if kind else ''}"

    orders = Counter(tuple(label(r) for r in call) for call in calls)
    typical, count = orders.most_common(1)[0]
    kept = [call for call in calls if tuple(label(r) for r in call) == typical]
    lines = [f"### {title}", "",
             f"{count} of {len(calls)} calls stamped in this order; medians over them (ms). "
             "step: from the stamp above; cpu: the thread's CPU in that step, when both stamps are the same thread's.",
             "", "| process | thread | stamp | size | at ms | step ms | cpu ms |", "|---|---|---|---:|---:|---:|---:|"]
    for i, name in enumerate(typical):
        at = statistics.median((call[i][0] - call[0][0]) / 1e6 for call in kept)
        step = statistics.median((call[i][0] - call[i - 1][0]) / 1e6 for call in kept) if i else 0.0
        same = i and kept[0][i][2:4] == kept[0][i - 1][2:4]  # (every kept call has the same labels)
        cpu = f"{statistics.median((call[i][1] - call[i - 1][1]) / 1e6 for call in kept):.3f}" if same else ""
        role, thread, stamp_name = name.split(":", 2)
        size = kept[0][i][5].split(" ")[1] if " " in kept[0][i][5] else ""
        thread = kept[0][i][3] if role == "worker" else ""
        lines.append(f"| {role} | {thread} | `{stamp_name.split(' ')[0]}` {' '.join(stamp_name.split(' ')[1:])} | "
                     f"{size} | {at:.3f} | {step:.3f} | {cpu} |")
    return "\n".join(lines)
