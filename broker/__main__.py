"""`ddml-broker` / `python -m broker`: build BrokerConfig from flags and env, run until SIGTERM."""

from __future__ import annotations

import logging
import signal
import threading
import time

import zmq

from broker.broker import Broker
from ddml_common.cli import Number, Parser, configure_logging, endpoint, stop_on_signals
from ddml_common.memory import keep_freed_buffers
from broker.config import BatchingConfig, BrokerConfig, HeartbeatConfig
from broker.health import HealthServer

logger = logging.getLogger("broker")

_LOCAL_PREFIXES = ("tcp://127.", "tcp://localhost:", "tcp://[::1]:", "ipc://", "inproc://")
_FLUSH_LINGER_MS = 2000  # after a drain, time for the last replies to leave (linger 0 would drop them)


def build_parser() -> Parser:
    parser = Parser(
        "ddml-broker",
        "Route requests from gateways (frontend) to workers (backend) in load-aware micro-batches.",
    )
    # Defaults come from the config dataclasses, so that there is one of each.
    batching, heartbeat, broker = BatchingConfig(), HeartbeatConfig(), BrokerConfig()
    parser.add_argument("--frontend", type=endpoint, default=broker.frontend,
                        help="endpoint gateways and clients connect to (port 0 = random)")
    parser.add_argument("--backend", type=endpoint, default=broker.backend,
                        help="endpoint workers connect to (port 0 = random)")
    parser.add_argument("--max-wait-ms", type=Number(float, minimum=0), default=batching.max_wait_s * 1000,
                        help="hold a partial batch this long for it to fill; 0 sends at once when a worker has room")
    parser.add_argument("--refill-wait-max-ms", type=Number(float, minimum=0),
                        default=batching.refill_wait_max_s * 1000,
                        help="a worker that just returned a batch of n waits for n new requests while they keep "
                             "coming fast (closed-loop clients coming back), for at most a quarter of that "
                             "batch's compute time and at most this; 0 = off")
    parser.add_argument("--max-queue", type=Number(int, minimum=1), default=batching.max_queue,
                        help="waiting requests per model before new ones get OVERLOADED (HTTP 503)")
    parser.add_argument("--max-queue-bytes", type=Number(int, minimum=1), default=batching.max_queue_bytes,
                        help="encoded inputs waiting per model, in bytes, before new requests get OVERLOADED")
    parser.add_argument("--max-attempts", type=Number(int, minimum=1), default=batching.max_attempts,
                        help="executions of one input (first try + re-dispatches after worker loss)")
    parser.add_argument("--max-batch-tokens", type=Number(int, minimum=0), default=batching.max_batch_tokens,
                        help="cap a batch's padded size (longest size hint x inputs); 0 = count cap only")
    parser.add_argument("--heartbeat-interval-ms", type=Number(float, above=0), default=heartbeat.interval_s * 1000,
                        help="heartbeat period, both ways")
    parser.add_argument("--liveness", type=Number(int, minimum=1), default=heartbeat.liveness,
                        help="missed heartbeat intervals before a worker is declared dead")
    parser.add_argument("--batch-timeout-s", type=Number(float, above=0), default=heartbeat.batch_timeout_floor_s,
                        help="floor of the per-batch deadline (it also scales with the worker's recent latency)")
    parser.add_argument("--curve-secret-key", default=None,
                        help="the broker's .key_secret (ddml-keys generate); turns on CurveZMQ on both sockets")
    parser.add_argument("--authorized-workers", default=None,
                        help="directory of worker public keys (.key) allowed on the backend; re-read on SIGHUP")
    parser.add_argument("--authorized-clients", default=None,
                        help="directory of gateway/client public keys allowed on the frontend; re-read on SIGHUP")
    parser.add_argument("--metrics-port", type=Number(int, minimum=0, maximum=65535), default=0,
                        help="serve Prometheus metrics at /metrics and the loop's liveness at /healthz "
                             "on this port (0 = off)")
    parser.add_argument("--stall-timeout-s", type=Number(float, above=0), default=10.0,
                        help="/healthz answers 503 once the broker's loop has not completed a pass for this long")
    parser.add_argument("--metrics-host", default="127.0.0.1", help="address the metrics server listens on")
    parser.add_argument("--drain-timeout-s", type=Number(float, minimum=0), default=broker.drain_timeout_s,
                        help="on SIGTERM, time allowed to answer requests already accepted")
    return parser


def config_from_args(args) -> BrokerConfig:
    return BrokerConfig(
        frontend=args.frontend,
        backend=args.backend,
        batching=BatchingConfig(
            max_wait_s=args.max_wait_ms / 1000,
            max_queue=args.max_queue,
            max_queue_bytes=args.max_queue_bytes,
            max_attempts=args.max_attempts,
            max_batch_tokens=args.max_batch_tokens,
            refill_wait_max_s=args.refill_wait_max_ms / 1000,
        ),
        heartbeat=HeartbeatConfig(
            interval_s=args.heartbeat_interval_ms / 1000,
            liveness=args.liveness,
            batch_timeout_floor_s=args.batch_timeout_s,
        ),
        drain_timeout_s=args.drain_timeout_s,
        curve_secret_key=args.curve_secret_key,
        authorized_workers=args.authorized_workers,
        authorized_clients=args.authorized_clients,
    )


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    try:
        config = config_from_args(args)
    except ValueError as error:
        parser.fail(f"invalid configuration: {error}")
    if args.stall_timeout_s <= config.heartbeat.interval_s:
        parser.fail(f"--stall-timeout-s ({args.stall_timeout_s:g}) must exceed the heartbeat interval "
                    f"({config.heartbeat.interval_s:g} s): an idle loop passes once per interval")
    if config.curve_secret_key and not (config.authorized_workers and config.authorized_clients):
        parser.fail("--curve-secret-key needs --authorized-workers and --authorized-clients")
    for endpoint in (config.frontend, config.backend):
        if not config.curve_secret_key and not endpoint.startswith(_LOCAL_PREFIXES):
            logger.warning("binding %s with no transport security: anyone who can reach it can use it", endpoint)
    keep_freed_buffers()  # a large input's frames reuse freed memory, not fresh pages (ddml_common/memory.py)
    stop = threading.Event()
    stop_on_signals(stop)
    context = zmq.Context()
    try:
        broker = Broker(config, context)
    except (ValueError, OSError) as error:
        context.destroy(linger=0)
        parser.fail(str(error))
    signal.signal(signal.SIGHUP, lambda *_: broker.request_reload())
    health = None
    try:
        broker.bind()
        if args.metrics_port:
            health = HealthServer(args.metrics_host, args.metrics_port, broker.metrics.registry,
                                  loop_age_s=lambda: time.monotonic() - broker.last_step_at,
                                  stall_timeout_s=args.stall_timeout_s)
    except (zmq.ZMQError, OSError) as error:
        broker.close(linger_ms=0)
        context.term()
        parser.fail(f"cannot listen: {error}")
    if health is not None:
        health.start()
        logger.info("metrics on http://%s:%d/metrics, liveness on /healthz", args.metrics_host, health.port)
    print(f"broker ready frontend={broker.frontend_endpoint} backend={broker.backend_endpoint}", flush=True)
    drained = False
    try:
        broker.run(should_stop=stop.is_set)
        broker.drain()
        drained = True
    finally:
        broker.close(linger_ms=_FLUSH_LINGER_MS if drained else 0)
        context.term()
        if health is not None:
            health.close()
    logger.info("broker stopped")


if __name__ == "__main__":
    main()
