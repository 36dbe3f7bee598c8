"""A hostile worker for real-process tests and bench/blackhole.py.

BlackHole speaks the protocol on a raw DEALER (through `protocol.encode`, no hand-built frames):
it registers for a model, heartbeats, takes every batch and never answers; when the broker drops
it ("expired: send READY") it registers again at once, as a real worker does. It is what a worker
with a wedged model and a live I/O thread, or a flapping link, looks like to the broker.
"""

from __future__ import annotations

import os
import threading
import time

import zmq

from ddml_common import protocol


class BlackHole:
    """Runs in its own thread, on its own socket, until close()."""

    def __init__(self, endpoint: str, model: str = "echo", max_batch_size: int = 8, max_batches: int = 1,
                 heartbeat_interval_s: float = 0.5):
        self.endpoint = endpoint
        self.model = model
        self.max_batch_size = max_batch_size
        self.max_batches = max_batches
        self.heartbeat_interval_s = heartbeat_interval_s
        self.batches = 0  # batches it was given (and swallowed)
        self.inputs = 0
        self.registrations = 0
        self._stop = threading.Event()
        self._registered = threading.Event()
        self._thread = threading.Thread(target=self._run, name="black-hole", daemon=True)

    def start(self, timeout_s: float = 10.0) -> "BlackHole":
        self._thread.start()
        if not self._registered.wait(timeout_s):
            raise TimeoutError(f"the black hole did not send READY within {timeout_s} s")
        return self

    def close(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            raise AssertionError(f"the black hole's thread did not stop within {timeout_s} s")

    def _run(self) -> None:
        context = zmq.Context.instance()
        socket = context.socket(zmq.DEALER)
        socket.setsockopt(zmq.LINGER, 0)
        socket.connect(self.endpoint)

        def send(message: protocol.Message) -> None:
            socket.send_multipart(protocol.encode(message))

        def ready() -> None:
            self.registrations += 1
            send(protocol.Ready([self.model], max_batch_size=self.max_batch_size, max_batches=self.max_batches,
                                pid=os.getpid()))

        try:
            ready()
            self._registered.set()
            heartbeat_due_at = 0.0
            while not self._stop.is_set():
                now = time.monotonic()
                if now >= heartbeat_due_at:
                    send(protocol.Heartbeat(registration=self.registrations))
                    heartbeat_due_at = now + self.heartbeat_interval_s
                if not socket.poll(50):
                    continue
                message = protocol.decode(socket.recv_multipart(zmq.NOBLOCK))
                if isinstance(message, protocol.Disconnect):
                    ready()  # "send READY": back within a millisecond, holding nothing
                elif isinstance(message, protocol.Batch):
                    self.batches += 1
                    self.inputs += len(message.inputs)
        finally:
            socket.close(linger=0)
