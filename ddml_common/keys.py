"""CurveZMQ keys for the workers and gateways that connect to a broker, and `ddml-keys`.

Keys are in the certificate format of pyzmq's zmq.auth (`ddml-keys generate DIR NAME`).
The broker's side (the ZAP authenticator and its allow-lists) is broker/curve.py.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import zmq
import zmq.auth

HANDSHAKE_IVL_MS = 5000  # a half-open handshake holds resources this long (libzmq default: 30 s)


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
        socket.setsockopt(zmq.HANDSHAKE_IVL, HANDSHAKE_IVL_MS)


def generate(directory: str, name: str) -> tuple[str, str]:
    """Write DIR/NAME.key (public) and DIR/NAME.key_secret (mode 0600)."""
    os.makedirs(directory, exist_ok=True)
    public_file, secret_file = zmq.auth.create_certificates(directory, name)
    os.chmod(secret_file, 0o600)
    return public_file, secret_file


def main(argv: list[str] | None = None) -> None:
    """`ddml-keys generate DIR NAME`: a CurveZMQ key pair for a broker, worker or gateway."""
    import argparse

    from ddml_common.cli import version

    parser = argparse.ArgumentParser(
        prog="ddml-keys",
        allow_abbrev=False,  # a flag means only itself
        description="Make CurveZMQ key pairs. Give the broker its .key_secret, copy each worker's and "
                    "gateway's .key (public) into the broker's --authorized-workers / --authorized-clients "
                    "directory, and give every worker and gateway the broker's .key.",
    )
    parser.add_argument("--version", action="version", version=f"ddml-keys {version()}")
    commands = parser.add_subparsers(dest="command", required=True)
    make = commands.add_parser("generate", help="write DIR/NAME.key (public) and DIR/NAME.key_secret (0600)")
    make.add_argument("directory", help="where to write the two files")
    make.add_argument("name", help="file name stem, e.g. broker, worker-gpu1, gateway-a")
    args = parser.parse_args(argv)
    public_file, secret_file = generate(args.directory, args.name)
    print(f"public key: {public_file}\nsecret key: {secret_file} (keep it private: mode 0600)")


if __name__ == "__main__":
    main()
