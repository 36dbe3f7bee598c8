"""BrokerClient's shutdown discipline, with a stand-in I/O thread (no sockets)."""

import os
import threading
import time

import zmq

from gateway.broker_client import BrokerClient


def test_close_does_not_hold_the_lock_while_it_waits_for_the_io_thread():
    """The I/O thread takes the client's lock to expire, resolve and fail requests. If close()
    held that lock while joining it, an I/O thread that reached for it as close() began would
    block until the join gave up (5 s), and then run on without its context."""
    client = BrokerClient("tcp://127.0.0.1:1")
    reached_lock = threading.Event()

    def io_thread_that_needs_the_lock_on_its_way_out() -> None:
        client._stopping.wait(10)
        with client._lock:
            reached_lock.set()

    client._context = zmq.Context()
    client._thread = threading.Thread(target=io_thread_that_needs_the_lock_on_its_way_out, daemon=True)
    client._pid = os.getpid()
    client._thread.start()
    started_at = time.monotonic()
    client.close()
    assert reached_lock.is_set()
    assert time.monotonic() - started_at < 2
    assert client._context.closed, "the context is destroyed once the I/O thread has stopped"
