"""CurveZMQ for the broker's two sockets, and for the workers and gateways that connect to them.

The broker is the CURVE server on both ROUTERs. A ZAP authenticator, started before either
socket binds, checks every handshake against a directory of public keys, with one ZAP domain
per socket: "gateway" on the frontend (--authorized-clients), "worker" on the backend
(--authorized-workers). So a gateway key cannot register as a worker, nor a worker key send
requests. ZAP_ENFORCE_DOMAIN makes libzmq refuse every handshake when the authenticator is not
running, instead of letting anyone in (its default). The broker also checks each message's
User-Id (the peer's public key, as ZAP approved it) against the current allow-list, so a key
removed and reloaded on SIGHUP loses its live connection at once, not at its next handshake.

Keys are in the certificate format of pyzmq's zmq.auth (`ddml-keys generate DIR NAME`, ddml_common/keys.py).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from ddml_common.keys import HANDSHAKE_IVL_MS

logger = logging.getLogger(__name__)

WORKER_DOMAIN = "worker"
GATEWAY_DOMAIN = "gateway"


class BrokerSecurity:
    """The broker's side: the authenticator, the server sockets' options, and the allow-lists."""

    def __init__(self, context: zmq.Context, secret_key_file: str, workers_dir: str, clients_dir: str):
        public, secret = zmq.auth.load_certificate(secret_key_file)
        if secret is None:
            raise ValueError(f"{secret_key_file} holds no secret key (use the .key_secret file)")
        for name, directory in (("--authorized-workers", workers_dir), ("--authorized-clients", clients_dir)):
            if not directory or not os.path.isdir(directory):
                raise ValueError(f"{name} must be a directory of public keys, got {directory!r}")
        self._public, self._secret = public, secret
        self._dirs = {WORKER_DOMAIN: workers_dir, GATEWAY_DOMAIN: clients_dir}
        self._context = context
        self.authenticator: ThreadAuthenticator | None = None
        self.allowed: dict[str, frozenset[bytes]] = {}

    def start(self) -> None:
        """Start the ZAP handler. Must run before any CURVE socket binds."""
        self.authenticator = ThreadAuthenticator(self._context, log=logging.getLogger("broker.zap"))
        self.authenticator.start()
        self.reload()

    def stop(self) -> None:
        if self.authenticator is not None:
            self.authenticator.stop()
            self.authenticator = None

    def reload(self) -> dict[str, frozenset[bytes]]:
        """Re-read both key directories. Returns what each domain lost."""
        previous = self.allowed
        self.allowed = {domain: _public_keys(directory) for domain, directory in self._dirs.items()}
        if self.authenticator is not None:
            for domain, directory in self._dirs.items():
                # The exact domain string: pyzmq maps only an empty domain to '*'.
                self.authenticator.configure_curve(domain=domain, location=directory)
        for domain, keys in self.allowed.items():
            logger.info("CURVE: %d authorised %s keys from %s", len(keys), domain, self._dirs[domain])
        return {domain: previous.get(domain, frozenset()) - keys for domain, keys in self.allowed.items()}

    def serve(self, socket: zmq.Socket, domain: str) -> None:
        """Make a ROUTER a CURVE server in `domain`. Call before bind()."""
        socket.curve_server = True
        socket.curve_secretkey = self._secret
        socket.curve_publickey = self._public
        socket.zap_domain = domain.encode()
        socket.setsockopt(zmq.ZAP_ENFORCE_DOMAIN, 1)  # no authenticator: nobody gets in
        socket.setsockopt(zmq.HANDSHAKE_IVL, HANDSHAKE_IVL_MS)

    def permits(self, domain: str, user_id: bytes | None) -> bool:
        return user_id is not None and user_id in self.allowed.get(domain, frozenset())


def _public_keys(directory: str) -> frozenset[bytes]:
    keys = set()
    for path in Path(directory).glob("*.key"):
        try:
            public, _ = zmq.auth.load_certificate(str(path))
        except (ValueError, OSError) as error:
            logger.warning("skipped unreadable key file %s: %s", path, error)
            continue
        keys.add(public)
    return frozenset(keys)
