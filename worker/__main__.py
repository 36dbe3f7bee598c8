"""`ddml-worker` / `python -m worker`: serve one model to a broker, from any host.

With --num-workers N (or --cuda-devices), this process becomes a supervisor: it spawns N
worker processes round-robin over the devices (each sees only its GPU), restarts any that
dies, and forwards SIGTERM so they drain. With --pool it does the same for pool workers, at
least one per GPU listed.
"""

from __future__ import annotations

import json
import logging
import os
import threading

from ddml_common import tracing
from ddml_common.cli import Parser, configure_logging, endpoints, stop_on_signals
from ddml_common.tensors import parse_flags
from worker.config import WorkerConfig
from worker.models import BUILT_IN_MODELS, load_handler
from worker.models.exported import EXPORT_SUFFIXES
from worker.pool import run_pool
from worker.serve import ModelLoadError, serve, supervise

logger = logging.getLogger("worker")


def build_parser() -> Parser:
    parser = Parser("ddml-worker", "Serve a model to a ddml broker. Run as many as you like, on any host.")
    parser.add_argument("--broker", type=endpoints, default="tcp://127.0.0.1:5556",
                        help="the broker's backend endpoint; several, comma-separated, to serve every one "
                             "(each gets this worker's registration, heartbeats and capacity)")
    parser.add_argument("--model", default="minilm",
                        help="model name clients ask for; built in: minilm (all-MiniLM-L6-v2), echo")
    parser.add_argument("--handler", default=None,
                        help="serve your own class: package.module:ClassName, a subclass of worker.Manager")
    parser.add_argument("--model-path", default=None, help="serve a local Hugging Face model directory")
    parser.add_argument("--input", action="extend", type=parse_flags, default=None, metavar="NAME:DATATYPE:DIMS",
                        help="a declared input tensor of an exported model (--model-path model.pt2 or .pt), "
                             "repeatable, in the order the model takes them: e.g. IMAGE:FP32:3,224,224 (dims "
                             "without the batch dimension; -1 variable); in TOML an array of such strings or of "
                             "{name, datatype, dims} tables")
    parser.add_argument("--output", action="extend", type=parse_flags, default=None, metavar="NAME:DATATYPE:DIMS",
                        help="a declared output tensor of an exported model, repeatable, in the order it returns them")
    parser.add_argument("--task", default="embedding", choices=["embedding", "classification", "rerank"],
                        help="what the --model-path model does; rerank: a cross-encoder that scores "
                             "(query, document) pairs")
    parser.add_argument("--model-version", default=None,
                        help="the version this worker reports and serves as MODEL@VERSION; default: a short hash "
                             "of the model's weights and configuration (none for handlers that give none)")
    parser.add_argument("--revision", default=None,
                        help="with a Hugging Face model id as --model-path: the branch, tag or commit to load "
                             "(from the local cache unless HF_HUB_OFFLINE=0)")
    parser.add_argument("--pooling", default=None,
                        help="built-in embedding models: cls, mean, max, mean_sqrt_len_tokens, weightedmean or "
                             "lasttoken (several joined by +), instead of the model's own (its sentence-transformers "
                             "Pooling config; mean for a plain transformers directory)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                        help="built-in text models' weights; auto = float16 on CUDA, float32 on the CPU")
    parser.add_argument("--auto-truncate", action="store_true",
                        help="built-in text models truncate inputs longer than --max-length instead of refusing "
                             "them with 400 (a request may still ask for either)")
    parser.add_argument("--device", default="auto", help="auto (CUDA if present, else CPU), cpu, or cuda:N")
    parser.add_argument("--cuda-devices", default="",
                        help="comma-separated GPU indices to spread --num-workers over, e.g. 0,1; with --pool, "
                             "at least one pool worker per GPU, each with its own budget")
    parser.add_argument("--num-workers", type=int, default=1,
                        help="worker processes to run (>1 or --cuda-devices: supervised, restarted on death); "
                             "with --pool, pool workers, each with its own pool id and budget")
    parser.add_argument("--supervise", action="store_true",
                        help="run the worker(s) as child processes and restart any that dies (implied by "
                             "--num-workers > 1 or --cuda-devices)")
    parser.add_argument("--max-batch-size", type=int, default=64, help="most inputs per batch")
    parser.add_argument("--max-batches", type=int, default=2,
                        help="batches held at once; 2 receives the next while one computes")
    parser.add_argument("--continuous", choices=("auto", "on", "off"), default="auto",
                        help="continuous batching: hold up to --max-inputs-held inputs from any number of batches, "
                             "form each forward pass from them (the longest-waiting input first, then those "
                             "nearest its length, or simply the oldest with --unpadded) and answer each input as "
                             "soon as its pass is done. auto = if the handler declares it (the built-in text "
                             "models do; echo and your own Manager keep whole batches unless they set "
                             "continuous = True)")
    parser.add_argument("--max-inputs-held", type=int, default=0,
                        help="with continuous batching, the most inputs held at once (the broker keeps the "
                             "worker supplied up to this); 0 = --max-batch-size × --max-batches")
    parser.add_argument("--compute-lanes", type=int, default=0,
                        help="with continuous batching, passes run at once, each in its own thread: lane 0 runs "
                             "every pass while it keeps up, with all --torch-threads when it takes all that is "
                             "held and no other lane has run for 1 s, else with its share, as the other lanes "
                             "(which run only while lane 0 is busy). 2 lets an input that arrives during a pass "
                             "start at once; 0 = the "
                             "handler's choice (the built-in text models: 2 on a CPU with 2 or more threads, "
                             "else 1; your own Manager: its compute_lanes, 1 unless set)")
    parser.add_argument("--max-length", type=int, default=None,
                        help="tokens per input for built-in text models; default: the model's own (its "
                             "max_seq_length, else its tokenizer's limit; 256 for a plain transformers embedding "
                             "or classification directory). Longer inputs get 400 unless truncation is asked for")
    parser.add_argument("--chunk-size", type=int, default=0,
                        help="built-in text models sort each batch by length and run it in passes of at most "
                             "this many inputs; 0 = by device (16 on the CPU, where a smaller batch still runs as "
                             "two halves of at least 8; 1024 on CUDA)")
    parser.add_argument("--chunk-tokens", type=int, default=0,
                        help="most tokens per pass, padded (inputs × the longest) or, with --unpadded, their "
                             "sum; 0 = by device (1024 on the CPU, 65536 on CUDA)")
    parser.add_argument("--unpadded", choices=("auto", "on", "off"), default="auto",
                        help="built-in text models: run each pass on its inputs' tokens laid end to end, without "
                             "padding (attention alone is padded), so that a pass of random lengths costs what its "
                             "tokens cost. BERT encoders only (MiniLM, BGE, E5, BERT cross-encoders), checked "
                             "against the model's own forward pass at load. auto = on a CPU")
    parser.add_argument("--onednn", choices=("auto", "off"), default="auto",
                        help="unpadded passes on a CPU: run their matrix products (and the feed-forward's GELU, "
                             "fused) through oneDNN, 5-10% faster than torch's MKL products on the AVX-512 CPUs "
                             "we measured, for passes of 64 tokens or more; checked against the model at load, "
                             "and off where this torch lacks them. off = torch's own products")
    parser.add_argument("--heartbeat-interval-ms", type=float, default=1000.0, help="heartbeat period")
    parser.add_argument("--liveness", type=int, default=3,
                        help="silent broker intervals before reconnecting")
    parser.add_argument("--watchdog-s", type=float, default=300.0,
                        help="exit (so a supervisor restarts us) if one batch computes longer than this")
    parser.add_argument("--health-file", default=None,
                        help="touch this file every heartbeat while the broker answers and no batch is stuck "
                             "(for a Kubernetes exec liveness probe)")
    parser.add_argument("--curve-server-key", default=None, help="the broker's public .key: turns on CurveZMQ")
    parser.add_argument("--curve-secret-key", default=None, help="this worker's .key_secret (ddml-keys generate)")
    parser.add_argument("--echo-test-directives", action="store_true",
                        help="for test suites only: the built-in echo model obeys directives in dict inputs "
                             "({'sleep_s': s}, {'raise': why}, {'invalid': why}, {'exit': code}); without it, "
                             "it echoes them")
    parser.add_argument("--torch-threads", type=int, default=0,
                        help="torch intra-op threads per process; 0 = cores / processes on the CPU")
    parser.add_argument("--pool", action="store_true",
                        help="a pool worker: start with no model, and load and unload the models of --repository "
                             "as placement decides from the brokers' demand (docs/placement.md); with "
                             "--num-workers or --cuda-devices, several, supervised")
    parser.add_argument("--repository", default=None,
                        help="with --pool: the TOML file of every model it may load, each a [models.NAME] table of "
                             "worker flags plus min-replicas, max-replicas, idle-unload-s and memory-mb")
    parser.add_argument("--max-models", type=int, default=4, help="with --pool: the most models held at once")
    parser.add_argument("--memory-budget-mb", type=float, default=0.0,
                        help="with --pool: the most memory each pool worker's models may take, measured after each "
                             "load on a GPU (on the CPU: each model's memory-mb, else its growth of this process); "
                             "0 = what its device has, shared equally by the pool workers on it")
    parser.add_argument("--otlp-endpoint", default=None,
                        help="export OpenTelemetry spans of traced requests' batches, forward passes and time "
                             "queued at the broker to this OTLP/HTTP collector (e.g. http://collector:4318); "
                             "needs ddml[otel]")
    return parser


def config_from_args(args) -> WorkerConfig:
    options = (
        {"max_length": args.max_length, "pass_size": args.chunk_size, "pass_tokens": args.chunk_tokens,
         "pooling": args.pooling, "dtype": args.dtype, "revision": args.revision, "auto_truncate": args.auto_truncate,
         "unpadded": args.unpadded, "onednn": args.onednn}
        if not args.handler and (args.model != "echo" or args.model_path) else {}
    )
    if args.model_path and args.model_path.endswith(EXPORT_SUFFIXES) and not args.handler:
        options = {"inputs": args.input or [], "outputs": args.output or [], "dtype": args.dtype,
                   "max_batch_size": args.max_batch_size}
    elif args.input or args.output:
        raise ValueError("--input and --output declare an exported model's tensors (--model-path model.pt2 or .pt); "
                         "a handler declares its own in metadata()")
    return WorkerConfig(
        broker=args.broker,
        model=args.model,
        handler=args.handler,
        model_path=args.model_path,
        task=args.task,
        model_version=args.model_version,
        device=args.device,
        max_batch_size=args.max_batch_size,
        max_batches=args.max_batches,
        continuous=args.continuous,
        max_inputs_held=args.max_inputs_held,
        compute_lanes=args.compute_lanes,
        heartbeat_interval_s=args.heartbeat_interval_ms / 1000,
        liveness=args.liveness,
        watchdog_s=args.watchdog_s,
        torch_threads=args.torch_threads,
        handler_options=options,
        health_file=args.health_file,
        curve_server_key=args.curve_server_key,
        curve_secret_key=args.curve_secret_key,
        echo_test_directives=args.echo_test_directives,
    )


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        config = config_from_args(args)
    except ValueError as error:
        parser.fail(f"invalid configuration: {error}")
    stop = threading.Event()
    if args.pool:
        run_pool(parser, args, config, stop, lambda argv: config_from_args(parser.parse_args(argv)))
        logger.info("pool worker stopped")
        return
    _check_model_source(parser, config)
    if args.otlp_endpoint and tracing.missing_package():
        parser.fail(f"--otlp-endpoint needs the {tracing.missing_package()} package: pip install 'ddml[otel]'")
    tracing.configure(args.otlp_endpoint, "ddml-worker")
    stop_on_signals(stop)
    cuda_devices = [d.strip() for d in args.cuda_devices.split(",") if d.strip()]
    if args.supervise or args.num_workers > 1 or cuda_devices:
        supervise(config, max(args.num_workers, 1), cuda_devices, f"{args.log_level}:{args.log_format}", stop)
    else:
        try:
            serve(config, stop)
        except ModelLoadError as error:
            parser.fail(str(error).splitlines()[0][:500])
    tracing.shutdown()
    logger.info("worker stopped: %s", json.dumps({"model": config.model}))


def _check_model_source(parser: Parser, config: WorkerConfig) -> None:
    """A --handler that does not import, or a --model-path directory that is not there, ends here in
    one line, not in a traceback from each worker process. (A Hugging Face model id is looked up
    when the model loads.)"""
    if config.handler:
        try:
            load_handler(config.handler)
        except (ImportError, AttributeError, TypeError, ValueError) as error:
            parser.fail(f"--handler {config.handler}: {error}")
    elif not config.model_path and config.model not in BUILT_IN_MODELS:
        parser.fail(f"--model {config.model}: not built in ({', '.join(BUILT_IN_MODELS)}): "
                    "give --model-path DIR or --handler module:Class")
    path = config.model_path
    if path and path.endswith(EXPORT_SUFFIXES):
        if not os.path.isfile(os.path.expanduser(path)):
            parser.fail(f"--model-path {path}: no such file")
    elif path and path.startswith(("/", ".", "~")) and not os.path.isdir(os.path.expanduser(path)):
        parser.fail(f"--model-path {path}: not a directory")


if __name__ == "__main__":
    main()
