"""Load over raw HTTP/1.1 keep-alive connections (asyncio): an open loop, or a closed one. One JSON line.

    .venv/bin/python -m bench.openloop --url http://127.0.0.1:8000/v1/models/minilm/predict --rate 60
        [--seconds 30] [--timeout 10] [--seed 1] [--inputs 1] [--shape inputs|openai]
    .venv/bin/python -m bench.openloop --url http://127.0.0.1:8004/embeddings --shape openai \\
        --concurrency 4 --inputs 256 --seconds 20

Open loop (--rate R): Poisson arrivals at R requests/s on average, their times drawn in advance
from --seed. Each request goes out at its scheduled time whatever became of the earlier ones, on
an idle keep-alive connection or on a new one (the pool grows while every connection is busy,
up to --max-connections; past that a request waits for one, and that wait counts too). Its
latency runs from its *scheduled* time, so a queue in the server, or in this generator, shows
in the latencies instead of being hidden by a client that waits for replies (coordinated
omission). A request without a whole reply --timeout seconds after its scheduled time is an
error (timeout), and its connection is dropped.

Closed loop (--concurrency N): N connections, each sending its next request when the reply to
the previous one has come. No request starts after --seconds; those in flight are waited for,
so all the work done counts: items/s = inputs answered / time to the last reply.

Bodies: the seeded workload (bench.workload), --inputs sentences a request, in the body shape of
--shape (SHAPES). Replies are read, not parsed: only the status counts. The JSON line holds
requests, ok, errors by kind, latency p50/p99/max in ms (successes and timeouts, a timeout at its
limit; other errors are only counted), req/s and items/s of the replies, connections opened, the
generator's largest lag behind its schedule, and its own CPU seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from urllib.parse import urlsplit

# How each system takes several inputs: the body around the JSON strings, joined by commas.
SHAPES = {
    "inputs": ('{"inputs": [', ']}'),  # ddml, naive, mosec, streamer: answers {"outputs": [[...], ...]}
    "openai": ('{"model": "minilm", "input": [', ']}'),  # infinity: answers {"data": [{"embedding": [...], ...}]}
}


def body(shape: str, texts: list[str]) -> bytes:
    prefix, suffix = SHAPES[shape]
    return (prefix + ",".join(json.dumps(text) for text in texts) + suffix).encode()


def embeddings(shape: str, document: dict) -> list[list[float]]:
    """The vectors of a reply to body(shape, texts), in the order of texts."""
    if shape == "openai":
        return [item["embedding"] for item in sorted(document["data"], key=lambda item: item["index"])]
    return document["outputs"]


def bodies(shape: str, texts: list[str], inputs: int, count: int, offset: int = 0) -> list[bytes]:
    """count bodies of `inputs` consecutive texts each, going round texts from offset."""
    out, position = [], offset % len(texts)
    for _ in range(count):
        if position + inputs > len(texts):
            position = 0
        out.append(body(shape, texts[position:position + inputs]))
        position += inputs
    return out


def poisson_arrivals(rate: float, seconds: float, seed: int) -> list[float]:
    """Send times (seconds from the start) of a Poisson process at `rate` per second."""
    rng, at, out = random.Random(seed), 0.0, []
    while True:
        at += rng.expovariate(rate)
        if at >= seconds:
            return out
        out.append(at)


def percentile(values: list[float], q: float) -> float:
    """Nearest rank; nan for no values."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))]


@dataclass
class Result:
    requests: int = 0
    ok: int = 0
    errors: Counter = field(default_factory=Counter)  # kind -> count: timeout, connection, http 5xx, ...
    latencies_ms: list[float] = field(default_factory=list)  # successes, and timeouts at their limit
    elapsed_s: float = 0.0  # start to the last reply (closed loop), or to the end of the schedule (open)
    inputs: int = 1
    connections: int = 0
    lag_ms_max: float = 0.0
    cpu_s: float = 0.0

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def summary(self) -> dict:
        """The figures (latencies nan when no request succeeded or timed out)."""
        return {"requests": self.requests, "ok": self.ok, "errors": dict(self.errors),
                "p50_ms": percentile(self.latencies_ms, 50), "p99_ms": percentile(self.latencies_ms, 99),
                "max_ms": max(self.latencies_ms, default=math.nan),
                "req_per_s": self.ok / self.elapsed_s if self.elapsed_s else 0.0,
                "items_per_s": self.ok * self.inputs / self.elapsed_s if self.elapsed_s else 0.0,
                "elapsed_s": self.elapsed_s, "connections": self.connections, "lag_ms_max": self.lag_ms_max,
                "generator_cpu_s": self.cpu_s}


class Pool:
    """Keep-alive connections to one host: an idle one if there is one, else a new one, up to limit."""

    def __init__(self, url: str, limit: int):
        parts = urlsplit(url)
        self.host, self.port = parts.hostname, parts.port or 80
        self.head = (f"POST {parts.path or '/'} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
                     "Content-Type: application/json\r\nContent-Length: ").encode()
        self.limit, self.open, self.opened = limit, 0, 0
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.waiting: deque[asyncio.Future] = deque()

    async def acquire(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        while not self.idle and self.open >= self.limit:
            waiter = asyncio.get_running_loop().create_future()
            self.waiting.append(waiter)
            try:
                await waiter
            finally:
                if waiter in self.waiting:
                    self.waiting.remove(waiter)
        while self.idle:
            connection = self.idle.pop()
            if not connection[0].at_eof() and not connection[1].is_closing():
                return connection
            self.release(connection)  # the server closed it while idle (its keep-alive timeout)
        return await self.connect()

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A new connection, counted against the limit."""
        self.open += 1
        try:
            connection = await asyncio.open_connection(self.host, self.port)
        except BaseException:
            self.release(None)
            raise
        self.opened += 1
        return connection

    def release(self, connection, reusable: bool = False) -> None:
        if connection is not None and reusable:
            self.idle.append(connection)
        else:
            if connection is not None:
                connection[1].close()
            self.open -= 1
        while self.waiting:
            waiter = self.waiting.popleft()
            if not waiter.done():
                waiter.set_result(None)
                break

    def close(self) -> None:
        for _, writer in self.idle:
            writer.close()
        self.idle.clear()


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes) -> tuple[int, bool]:
    """Send one request, read its whole reply; returns the status and whether the connection stays open."""
    writer.write(request)
    status_line = await reader.readline()
    if not status_line:
        raise ConnectionError("connection closed before a reply")
    status, length, chunked, keep = int(status_line.split()[1]), None, False, True
    while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
        name, _, value = line.partition(b":")
        name, value = name.strip().lower(), value.strip().lower()
        if name == b"content-length":
            length = int(value)
        elif name == b"transfer-encoding":
            chunked = b"chunked" in value
        elif name == b"connection":
            keep = b"close" not in value
    if chunked:
        while size := int((await reader.readline()).split(b";")[0], 16):
            await reader.readexactly(size + 2)
        while await reader.readline() not in (b"\r\n", b"\n", b""):  # trailers
            pass
    elif length is not None:
        await reader.readexactly(length)
    else:
        await reader.read()
        keep = False
    return status, keep


async def _one(pool: Pool, payload: bytes, since: float, timeout_s: float, result: Result) -> float:
    """One request, its latency counted from `since`; it is given until since + timeout_s.
    Returns when its reply came (or `since` if it failed)."""
    loop = asyncio.get_running_loop()
    result.requests += 1
    connection, keep = None, False
    try:
        async with asyncio.timeout_at(since + timeout_s):
            request = pool.head + b"%d\r\n\r\n" % len(payload) + payload
            opened = pool.opened
            connection = await pool.acquire()
            try:
                status, keep = await _exchange(*connection, request)
            except ConnectionError:
                if pool.opened != opened:  # a new connection: nothing to retry
                    raise
                # A kept-alive connection the server closed as we reused it: it never read the
                # request, so send it again on a new connection, as HTTP clients do.
                pool.release(connection)
                connection = await pool.connect()
                status, keep = await _exchange(*connection, request)
    except TimeoutError:
        result.errors["timeout"] += 1
        result.latencies_ms.append(timeout_s * 1000)
    except (OSError, ConnectionError, ValueError, IndexError, asyncio.IncompleteReadError) as error:
        result.errors[f"connection ({type(error).__name__})"] += 1
    else:
        if 200 <= status < 300:
            result.ok += 1
            result.latencies_ms.append((loop.time() - since) * 1000)
            return loop.time()
        result.errors[f"http {status}"] += 1
    finally:
        if connection is not None:
            pool.release(connection, keep)
    return since


async def open_loop(url: str, payloads: list[bytes], arrivals: list[float], timeout_s: float = 10.0,
                    inputs: int = 1, max_connections: int = 1024) -> Result:
    """payloads[i % len] is sent at start + arrivals[i], whatever became of the earlier ones."""
    loop, pool, result = asyncio.get_running_loop(), Pool(url, max_connections), Result(inputs=inputs)
    cpu_before, tasks = time.process_time(), []
    start = loop.time() + 0.05
    for index, at in enumerate(arrivals):
        scheduled = start + at
        if scheduled > loop.time():
            await asyncio.sleep(scheduled - loop.time())
        result.lag_ms_max = max(result.lag_ms_max, (loop.time() - scheduled) * 1000)
        tasks.append(asyncio.create_task(_one(pool, payloads[index % len(payloads)], scheduled, timeout_s, result)))
    ended = await asyncio.gather(*tasks)
    pool.close()
    # Replies/s over the schedule, or until the last reply if the server fell behind it.
    result.elapsed_s = max(arrivals[-1], max(ended) - start) if arrivals else 0.0
    result.connections, result.cpu_s = pool.opened, time.process_time() - cpu_before
    return result


async def closed_loop(url: str, payloads: list[bytes], concurrency: int, seconds: float, timeout_s: float = 60.0,
                      inputs: int = 1) -> Result:
    """concurrency clients back to back until `seconds`; then those in flight finish and count."""
    loop, pool, result = asyncio.get_running_loop(), Pool(url, concurrency), Result(inputs=inputs)
    cpu_before, start = time.process_time(), loop.time()
    last_reply = start

    async def client(index: int) -> None:
        nonlocal last_reply
        while loop.time() < start + seconds:
            sent = loop.time()
            ended = await _one(pool, payloads[index % len(payloads)], sent, timeout_s, result)
            last_reply = max(last_reply, ended)  # not max(last_reply, await ...): that reads it before the wait
            index += concurrency
            if ended == sent:  # it failed: no busy loop against a server that refuses at once
                await asyncio.sleep(0.05)

    await asyncio.gather(*(client(index) for index in range(concurrency)))
    pool.close()
    result.elapsed_s = last_reply - start
    result.connections, result.cpu_s = pool.opened, time.process_time() - cpu_before
    return result


def main() -> None:
    from bench.workload import sentences

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True, help="where to POST, e.g. "
                        "http://127.0.0.1:8000/v1/models/minilm/predict")
    load = parser.add_mutually_exclusive_group(required=True)
    load.add_argument("--rate", type=float, help="open loop: mean requests/s of Poisson arrivals")
    load.add_argument("--concurrency", type=int, help="closed loop: clients sending back to back")
    parser.add_argument("--seconds", type=float, default=30.0, help="of the schedule (open loop), or of new "
                        "requests (closed loop)")
    parser.add_argument("--timeout", type=float, help="seconds a request is given, from its scheduled time (open "
                        "loop, default 10) or from its sending (closed loop, default 60)")
    parser.add_argument("--seed", type=int, default=1, help="of the arrival times")
    parser.add_argument("--inputs", type=int, default=1, help="sentences a request")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="inputs", help="the body shape")
    parser.add_argument("--max-connections", type=int, default=1024, help="open loop: the pool's limit")
    args = parser.parse_args()
    texts = sentences(5000, seed=2)
    if args.rate is not None:
        arrivals = poisson_arrivals(args.rate, args.seconds, args.seed)
        payloads = bodies(args.shape, texts, args.inputs, max(1, min(len(arrivals), 5000)))
        result = asyncio.run(open_loop(args.url, payloads, arrivals, args.timeout or 10.0, args.inputs,
                                       args.max_connections))
    else:
        payloads = bodies(args.shape, texts, args.inputs, 256)
        result = asyncio.run(closed_loop(args.url, payloads, args.concurrency, args.seconds, args.timeout or 60.0,
                                         args.inputs))
    print(json.dumps({k: None if isinstance(v, float) and math.isnan(v) else v for k, v in result.summary().items()}))


if __name__ == "__main__":
    main()
