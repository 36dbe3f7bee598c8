"""`ddml-status --broker tcp://HOST:PORT[,tcp://HOST2:PORT] [--watch] [-o json]`: what the brokers see.

With several brokers, a first table lists each: endpoint, role (`preferred`: the first that
answers, whose view the other tables show; `standby`; `down`), instance, workers, queued
requests and requests in flight; `-o json` has them under `brokers`, each with its whole view.

Workers: host, device, model, version, state, inputs in flight, batches/s, p50 batch latency
(of its last 64 batches), last heartbeat age. Queues: depth, oldest wait, mean batch size; a
queue named `model@version` holds the requests pinned to that version. A model that live workers
serve at more than one version (a rollout) gets a line that names them all.

With `-o json`: the broker's whole status, the document the tables are drawn from, as one JSON
object (a line per refresh with --watch): `instance_id`, `models` (per queue: workers, queued
requests and inputs, oldest wait, mean batch size, batches, redispatched, outcomes), `workers`
(per worker: id, host, pid, device, models, state, inputs in flight, batches, p50 batch latency,
heartbeat age) and `stats`. Each worker also gets `batches_per_s` since the refresh before.

With pool workers (docs/placement.md), three more tables: placements (per model, the workers that
hold it and those loading it), pool workers (what each holds, loads and failed to load, its models
against --max-models, its memory against its budget), and the latest pool events (loads started,
finished or failed, with their seconds; unloads with their reason: `idle`, `evicted for M`), at
this machine's wall-clock time. `-o json` has them under `pool_events`, each with an `at` (Unix
seconds) beside the broker's `age_s`.
"""

from __future__ import annotations

import json
import os
import sys
import time

from ddml_common.cli import Number, Parser, endpoints
from ddml_common.keys import ClientKeys
from gateway.broker_client import BrokerClient, BrokerError


def build_parser() -> Parser:
    parser = Parser("ddml-status", "Print the broker's workers and queues.", section="status")
    parser.add_argument("--broker", type=endpoints, default="tcp://127.0.0.1:5555",
                        help="the broker's frontend endpoint; several, comma-separated, for every broker's view")
    parser.add_argument("--watch", action="store_true", help="refresh every --interval-s until Ctrl-C")
    parser.add_argument("--interval-s", type=Number(float, above=0), default=2.0, help="refresh period with --watch")
    parser.add_argument("--curve-server-key", default=None, help="the broker's public .key, if CURVE is on")
    parser.add_argument("--curve-secret-key", default=None, help="an authorised client's .key_secret")
    parser.add_argument("-o", "--output", default="table", choices=["table", "json"],
                        help="tables for people, or the broker's status as one JSON object (a line per refresh)")
    return parser


def _table(headers: list[str], rows: list[list]) -> str:
    cells = [headers] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in cells]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)


def render_json(status: dict, previous: dict | None, elapsed_s: float, wall_now: float | None = None) -> str:
    before = {w["worker_id"]: w["batches"] for w in (previous or {}).get("workers", [])}
    workers = [{**w, "batches_per_s": round((w["batches"] - before[w["worker_id"]]) / elapsed_s, 3)
                if w["worker_id"] in before and elapsed_s > 0 else 0.0} for w in status["workers"]]
    wall_now = time.time() if wall_now is None else wall_now
    document = {**status, "workers": workers}
    if "pool_events" in status:
        document["pool_events"] = [{**e, "at": round(wall_now - e["age_s"], 3)} for e in status["pool_events"]]
    return json.dumps(document, sort_keys=True, default=str)


def _worker_name(worker: dict) -> str:
    return worker["pool"]["id"] if "pool" in worker else f"{worker['host']}:{worker['pid']}"


def render_pool(status: dict, wall_now: float) -> list[str]:
    """Placements, pool workers and the latest pool events; nothing without pool workers or events."""
    pool = sorted((w for w in status["workers"] if "pool" in w), key=_worker_name)
    events = status.get("pool_events", [])
    if not pool and not events:
        return []
    placements = []
    for name, info in sorted(status["models"].items()):
        loaded = sorted(_worker_name(w) for w in status["workers"] if name in w["models"])
        loading = [_worker_name(w) for w in pool if name in w["pool"]["loading"]]
        if "replicas" in info or loaded or loading:
            placements.append([name, len(loaded), " ".join(loaded) or "-", len(loading), " ".join(loading) or "-"])
    workers = []
    for w in pool:
        entry, stats = w["pool"], w.get("stats") or {}
        used_mb = stats.get("pool_memory_used_mb", sum(entry["held_mb"].values()))
        budget_mb = entry.get("budget_mb", stats.get("pool_memory_budget_mb", 0))
        workers.append([_worker_name(w), w["device"], ",".join(sorted(entry["held_mb"])) or "-",
                        ",".join(entry["loading"]) or "-", ",".join(sorted(entry["failed"])) or "-",
                        f"{len(entry['held_mb']) + len(entry['loading'])}/{entry.get('max_models', '?')}",
                        f"{used_mb:.0f}/{budget_mb:.0f}" if budget_mb else f"{used_mb:.0f}/-"])
    rows = [[time.strftime("%H:%M:%S", time.localtime(wall_now - e["age_s"])), e["pool_id"], e["kind"], e["model"],
             e["reason"] + (f": {e['error'][:60]}" if e.get("error") else ""),
             f"{e['seconds']:.2f}" if e["kind"] in ("loaded", "load_failed", "unloaded") else "-"]
            for e in events]
    loads = sum(len(w["pool"]["loading"]) for w in pool)
    return [
        "",
        f"pool: {len(pool)} workers, {loads} loads in progress",
        _table(["MODEL", "LOADED", "LOADED-ON", "LOADING", "LOADING-ON"], placements),
        "",
        _table(["POOL-WORKER", "DEVICE", "HELD", "LOADING", "FAILED", "MODELS/MAX", "MEMORY-MB/BUDGET"], workers),
        "",
        "latest pool events" + ("" if rows else ": none"),
        *([_table(["TIME", "POOL-WORKER", "EVENT", "MODEL", "REASON", "SECONDS"], rows)] if rows else []),
    ]


def render(status: dict, previous: dict | None, elapsed_s: float, wall_now: float | None = None) -> str:
    before = {w["worker_id"]: w for w in (previous or {}).get("workers", [])}
    workers = []
    for w in sorted(status["workers"], key=lambda w: (w["models"], w["host"], w["pid"])):
        old = before.get(w["worker_id"])
        rate = (w["batches"] - old["batches"]) / elapsed_s if old and elapsed_s > 0 else 0.0
        names = [m for m in w["models"] if "@" not in m]
        versions = [m.partition("@")[2] for m in w["models"] if "@" in m]
        workers.append([w["worker_id"][:16], w["host"], w["pid"], w["device"], ",".join(names),
                        ",".join(versions) or "-", w["state"],
                        w["in_flight_items"], f"{rate:.1f}", f"{w['p50_batch_latency_ms']:.1f}",
                        f"{w['last_heartbeat_age_s']:.1f}s"])
    queues = [[name, info["workers"], info["queued_requests"], info["queued_items"], f"{info['oldest_wait_s']:.3f}s",
               f"{info['mean_batch_size']:.1f}", info["batches"], info["redispatched"],
               " ".join(f"{k}={v}" for k, v in sorted(info["outcomes"].items()))]
              for name, info in sorted(status["models"].items())]
    served: dict[str, set[str]] = {}
    for w in status["workers"]:
        for m in w["models"]:
            if "@" in m:
                name, _, version = m.partition("@")
                served.setdefault(name, set()).add(version)
    rollouts = [f"model {name} is served at {len(versions)} versions: {', '.join(sorted(versions))}"
                for name, versions in sorted(served.items()) if len(versions) > 1]
    brokers = [[b["endpoint"], b["role"], b.get("instance_id") or "-", len(b.get("workers", [])) if "workers" in b
                else "-", sum(m["queued_requests"] for m in b["models"].values()) if "models" in b else "-",
                b["stats"].get("in_flight_requests", 0) if "stats" in b else "-"]
               for b in status.get("brokers", [])]
    return "\n".join([
        f"broker {status['instance_id']}  requests in flight: {status['stats'].get('in_flight_requests', 0)}",
        *rollouts,
        "",
        *([_table(["BROKER", "ROLE", "INSTANCE", "WORKERS", "QUEUED", "IN-FLIGHT"], brokers), ""]
          if len(brokers) > 1 else []),
        _table(["WORKER", "HOST", "PID", "DEVICE", "MODEL", "VERSION", "STATE", "IN-FLIGHT", "BATCHES/S",
                "P50-BATCH-MS", "HEARTBEAT"], workers),
        "",
        _table(["MODEL", "WORKERS", "QUEUED", "INPUTS", "OLDEST-WAIT", "MEAN-BATCH", "BATCHES", "REDISPATCHED",
                "OUTCOMES"], queues),
        *render_pool(status, time.time() if wall_now is None else wall_now),
    ])


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        client = BrokerClient(args.broker, curve=ClientKeys.from_files(args.curve_server_key, args.curve_secret_key))
    except (ValueError, OSError) as error:
        parser.fail(f"invalid configuration: {error}")
    draw = render_json if args.output == "json" else render
    previous, previous_at = None, time.monotonic()
    try:
        while True:
            try:
                status = client.status(timeout_s=3.0)
            except BrokerError as error:
                print(f"ddml-status: {error.message}", file=sys.stderr)
                if not args.watch:
                    sys.exit(1)
                time.sleep(args.interval_s)
                continue
            now = time.monotonic()
            if args.watch and args.output == "table":
                sys.stdout.write("\x1b[2J\x1b[H" if os.isatty(1) else "\n")
            print(draw(status, previous, now - previous_at), flush=True)
            if not args.watch:
                return
            previous, previous_at = status, now
            time.sleep(args.interval_s)
    except KeyboardInterrupt:
        pass
    except BrokenPipeError:  # the reader went away (`ddml-status -o json | head`): stop, quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nor fail flushing at exit
        sys.exit(1)
    finally:
        client.close()


if __name__ == "__main__":
    main()
