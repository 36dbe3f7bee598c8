"""Creating sockets, and sending and receiving multipart messages with int flags.

new_socket() is the one place that sets socket options for the broker, workers and gateways, so
that every socket that talks ddml refuses oversized frames, pings its peer and never blocks on close.

send_frames(), recv_routed() and recv_message() are the helpers every hot path shares.

pyzmq's send_multipart() combines enum flags for every frame, which costs about 2 µs a frame.
A request crosses four sockets on its way and four on its way back, with five frames each, so
on the broker's hot path the enum arithmetic alone was about a tenth of the time per request.
libzmq still sends a multipart message atomically: the HWM check and ROUTER_MANDATORY's
EHOSTUNREACH happen at the first frame, so a failure never leaves half a message queued.
"""

from __future__ import annotations

import zmq

from ddml_common.protocol import MAX_MESSAGE_BYTES

_MORE = int(zmq.SNDMORE)
_DONTWAIT = int(zmq.DONTWAIT)
_RCVMORE = int(zmq.RCVMORE)
_VIEW_FROM_BYTES = zmq.COPY_THRESHOLD  # a received frame this large is used in place rather than copied


ZMTP_HEARTBEAT_IVL_MS = 1000  # ZMTP pings kill half-open TCP connections
ZMTP_HEARTBEAT_TIMEOUT_MS = 5000


def new_socket(context: zmq.Context, kind: int, hwm: int | None = None, identity: bytes | None = None,
               reconnect_ivl_max_ms: int = 1000) -> zmq.Socket:
    """A socket that speaks ddml, with every option that matters set the same way for all roles.

    - MAXMSGSIZE: a frame over the protocol's limit is refused before it is allocated;
    - LINGER 0: close() never blocks (pass a linger to close() where the last sends matter);
    - ZMTP heartbeats: a peer behind a half-open TCP connection is noticed;
    - hwm: messages queued per peer each way; past it a DONTWAIT send raises zmq.Again;
    - ROUTER_MANDATORY on a ROUTER: a send to an unknown peer raises instead of vanishing.
    """
    socket = context.socket(kind)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES)
    socket.setsockopt(zmq.HEARTBEAT_IVL, ZMTP_HEARTBEAT_IVL_MS)
    socket.setsockopt(zmq.HEARTBEAT_TIMEOUT, ZMTP_HEARTBEAT_TIMEOUT_MS)
    if hwm is not None:
        socket.setsockopt(zmq.SNDHWM, hwm)
        socket.setsockopt(zmq.RCVHWM, hwm)
    if identity is not None:
        socket.setsockopt(zmq.IDENTITY, identity)
    if kind == zmq.ROUTER:
        socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
    else:
        socket.setsockopt(zmq.RECONNECT_IVL, 100)
        socket.setsockopt(zmq.RECONNECT_IVL_MAX, reconnect_ivl_max_ms)
    return socket


def send_frames(socket: zmq.Socket, frames: list, dontwait: bool = True) -> None:
    """Send frames as one message. With dontwait, raises zmq.Again instead of blocking."""
    last = _DONTWAIT if dontwait else 0
    more = last | _MORE
    send = socket.send
    # copy=False: a frame of at least zmq.COPY_THRESHOLD (64 KB) goes out from its own buffer rather
    # than a copy (for a 602 KB image, 0.6 MB copied into fresh pages at each hop); smaller frames are
    # copied by pyzmq as before. Frames are bytes, never changed after they are handed over here.
    for frame in frames[:-1]:
        send(frame, more, copy=False)
    send(frames[-1], last, copy=False)


def recv_routed(socket: zmq.Socket) -> tuple[bytes, list[bytes]]:
    """One message from a ROUTER, without blocking: (the peer's identity, its frames).

    Raises zmq.Again when none is waiting. A ROUTER hands over the identity and the message's
    frames at once, and a message has at least one frame, so the frame after the identity is
    always there; that saves recv_multipart() one RCVMORE query per message (2 µs each).
    """
    identity = socket.recv(_DONTWAIT)
    return identity, _frames(socket, socket.recv())


def recv_message(socket: zmq.Socket) -> list[bytes]:
    """One message from a DEALER, without blocking (raises zmq.Again when none is waiting)."""
    return _frames(socket, socket.recv(_DONTWAIT))


def _frames(socket: zmq.Socket, first: bytes) -> list:
    """The first frame (a message's body: small) as bytes, and any after it (a REQUEST's or a BATCH's
    large inputs, docs/protocol.md) as views of the frames libzmq received: no copy of a large tensor.
    A view keeps its frame alive, and is never written to."""
    frames = [first]
    while socket.get(_RCVMORE):
        frame = socket.recv(copy=False)
        frames.append(frame.buffer if len(frame) >= _VIEW_FROM_BYTES else frame.bytes)
    return frames
