"""The gateway's sockets to its brokers: one way to make a DEALER, and the few moves every
transport makes on it. No decisions here (gateway/requests.py makes them)."""

from __future__ import annotations

import logging

import zmq
from zmq.utils.monitor import recv_monitor_message

from ddml_common import protocol
from ddml_common.keys import ClientKeys
from ddml_common.sockets import new_socket, send_frames
from gateway.links import Links
from gateway.requests import Requests, Send

logger = logging.getLogger(__name__)

DEALER_HWM = 100_000  # messages queued each way on a DEALER to the broker: a gateway has many requests in flight
THREAD_ZMTP_HEARTBEAT_IVL_MS = 10_000  # ZMTP pings on a request thread's DEALERs (the I/O thread's: 1 s)


def connect_dealer(context: zmq.Context, endpoint: str, curve: ClientKeys | None,
                   request_thread: bool = False) -> zmq.Socket:
    """A DEALER to one broker: the I/O thread's, or a request thread's own."""
    dealer = new_socket(context, zmq.DEALER, hwm=DEALER_HWM)
    dealer.setsockopt(zmq.IMMEDIATE, 1)  # with no broker connection, fail fast instead of queueing
    if request_thread:
        # The I/O thread's DEALER and its heartbeats tell when a broker dies; a request thread's
        # only needs to notice a half-open connection eventually. A gateway has a DEALER per
        # thread and broker, and at ZMTP's 1 s pings the idle ones cost every broker CPU.
        dealer.setsockopt(zmq.HEARTBEAT_IVL, THREAD_ZMTP_HEARTBEAT_IVL_MS)
        dealer.setsockopt(zmq.HEARTBEAT_TIMEOUT, 3 * THREAD_ZMTP_HEARTBEAT_IVL_MS)
    if curve is not None:
        curve.apply(dealer)
    dealer.connect(endpoint)
    return dealer


def send_quietly(socket: zmq.Socket, frames: list[bytes]) -> bool:
    """Send without blocking; False if the socket cannot take it now (no connection, or full)."""
    try:
        send_frames(socket, frames)
        return True
    except zmq.Again:
        return False


def send_requests(socket: zmq.Socket, sends: list[Send]) -> bool:
    """Requests' requests to one broker, together (Requests.flush's send_together): one REQUESTS message,
    a lone one as a REQUEST. False if the socket cannot take it now."""
    message = sends[0].message if len(sends) == 1 else protocol.Requests([s.message for s in sends])
    return send_quietly(socket, protocol.encode(message))


def drain(socket: zmq.Socket) -> None:
    while True:
        try:
            socket.recv(zmq.NOBLOCK)
        except zmq.Again:
            return


def disconnected(monitor: zmq.Socket) -> bool:
    """Read a monitor's events; True if one says the connection dropped."""
    dropped = False
    while monitor.poll(0):
        dropped |= recv_monitor_message(monitor)["event"] == zmq.EVENT_DISCONNECTED
    return dropped


def deliver(frames: list[bytes], index: int, links: Links, requests: Requests, now: float) -> None:
    """A message from broker `index`, handed to whom it concerns: replies to the requests, a heartbeat
    to the links. A malformed one is dropped with a warning."""
    endpoint = links[index].endpoint
    links.heard(index, now)
    try:
        message = protocol.decode(frames)
    except protocol.DecodeError as error:
        logger.warning("dropped malformed message from broker %s: %s", endpoint, error)
        return
    match message:
        case protocol.Reply() | protocol.Replies():
            for reply in protocol.replies_of(message):
                requests.reply(index, reply, now)
        case protocol.Status():
            # It names the instance as a heartbeat does. A client whose first exchange with the
            # broker was a status (its first heartbeat not yet answered) must know the instance
            # too, or the broker's restart then looks like first contact, and a request waits it out.
            if message.instance_id:
                links.heartbeat(index, message.instance_id, now)
            requests.reply(index, message, now)
        case protocol.Heartbeat():
            links.heartbeat(index, message.instance_id, now)
        case protocol.Error():
            logger.error("broker %s refused a message: %s %s", endpoint, message.code, message.message)
        case _:
            logger.warning("unexpected %s from broker %s", type(message).__name__, endpoint)
