"""CurveZMQ for the broker's two sockets, and for the workers and gateways that connect to them.

The broker is the CURVE server on both ROUTERs. A ZAP authenticator, started before either
socket binds, checks every handshake against a directory of public keys, with one ZAP domain
per socket: "gateway" on the frontend (--authorized-clients), "worker" on the backend
(--authorized-workers). So a gateway key cannot register as a worker, nor a worker key send
requests. ZAP_ENFORCE_DOMAIN makes libzmq refuse every handshake when the authenticator is not
running, instead of letting anyone in (its default). The broker also checks each message's
User-Id (the peer's public key, as ZAP approved it) against the current allow-list, so a key
removed and reloaded on SIGHUP loses its live connection at once, not at its next handshake.

Keys are in the certificate format of pyzmq's zmq.auth (`ddml-keys generate DIR NAME`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

logger = logging.getLogger(__name__)

WORKER_DOMAIN = "worker"
GATEWAY_DOMAIN = "gateway"
_HANDSHAKE_IVL_MS = 5000  # a half-open handshake holds resources this long (libzmq default: 30 s)


@dataclass(frozen=True)
class ClientKeys:
    """What a worker or gateway needs to reach a CURVE broker."""

    server_public: bytes  # the broker's public key (z85)
    public: bytes  # our own
    secret: bytes

    @classmethod
    def load(cls, server_key_file: str, secret_key_file: str) -> "ClientKeys":
        server_public, _ = zmq.auth.load_certificate(server_key_file)
        public, secret = zmq.auth.load_certificate(secret_key_file)
        if secret is None:
            raise ValueError(f"{secret_key_file} holds no secret key (use the .key_secret file)")
        return cls(server_public, public, secret)

    @classmethod
    def from_files(cls, server_key_file: str | None, secret_key_file: str | None) -> "ClientKeys | None":
        if not server_key_file and not secret_key_file:
            return None
        if not (server_key_file and secret_key_file):
            raise ValueError("CURVE needs both --curve-server-key and --curve-secret-key")
        return cls.load(server_key_file, secret_key_file)

    def apply(self, socket: zmq.Socket) -> None:
        """Make a connecting socket a CURVE client of the broker. Call before connect()."""
        socket.curve_serverkey = self.server_public
        socket.curve_publickey = self.public
        socket.curve_secretkey = self.secret
        socket.setsockopt(zmq.HANDSHAKE_IVL, _HANDSHAKE_IVL_MS)


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
        socket.setsockopt(zmq.HANDSHAKE_IVL, _HANDSHAKE_IVL_MS)

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


def generate(directory: str, name: str) -> tuple[str, str]:
    """Write DIR/NAME.key (public) and DIR/NAME.key_secret (mode 0600)."""
    os.makedirs(directory, exist_ok=True)
    public_file, secret_file = zmq.auth.create_certificates(directory, name)
    os.chmod(secret_file, 0o600)
    return public_file, secret_file


def main(argv: list[str] | None = None) -> None:
    """`ddml-keys generate DIR NAME`: a CurveZMQ key pair for a broker, worker or gateway."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="ddml-keys",
        description="Make CurveZMQ key pairs. Give the broker its .key_secret, copy each worker's and "
                    "gateway's .key (public) into the broker's --authorized-workers / --authorized-clients "
                    "directory, and give every worker and gateway the broker's .key.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("generate", help="write DIR/NAME.key (public) and DIR/NAME.key_secret (0600)")
    make.add_argument("directory", help="where to write the two files")
    make.add_argument("name", help="file name stem, e.g. broker, worker-gpu1, gateway-a")
    args = parser.parse_args(argv)
    public_file, secret_file = generate(args.directory, args.name)
    print(f"public key: {public_file}\nsecret key: {secret_file} (keep it private: mode 0600)")


if __name__ == "__main__":
    main()
