"""CurveZMQ on the broker: only authorised workers and gateways get in, in their own roles, and
revocation and a stopped authenticator fail closed. Each attacker must reach no worker or client."""

from __future__ import annotations

import shutil
import signal
import threading
import uuid
from pathlib import Path

import pytest
import zmq

from ddml_common import protocol
from broker.broker import Broker
from broker.config import BrokerConfig
from ddml_common.keys import ClientKeys, generate
from ddml_common.protocol import ErrorCode
from gateway.broker_client import BrokerClient, BrokerError
from tests.chaos import Tally, live_pids
from tests.processes import free_port, wait_until

pytestmark = pytest.mark.integration

HB = ("--heartbeat-interval-ms", "200")
REV = ("--model", "rev", "--handler", "tests.handlers:ReverseModel")


class Keys:
    """A broker key pair, authorised workers and gateways, and some that are not."""

    def __init__(self, root: Path):
        self.root = root
        self.workers_dir, self.clients_dir = root / "authorized-workers", root / "authorized-clients"
        self.workers_dir.mkdir()
        self.clients_dir.mkdir()
        for name in ("broker", "worker-a", "worker-b", "gateway-a", "gateway-b", "rogue", "other-broker"):
            generate(str(root / "keys"), name)
        for name in ("worker-a", "worker-b"):
            shutil.copy(self.public(name), self.workers_dir)
        for name in ("gateway-a", "gateway-b"):
            shutil.copy(self.public(name), self.clients_dir)

    def public(self, name: str) -> str:
        return str(self.root / "keys" / f"{name}.key")

    def secret(self, name: str) -> str:
        return str(self.root / "keys" / f"{name}.key_secret")

    def broker_flags(self) -> tuple[str, ...]:
        return ("--curve-secret-key", self.secret("broker"), "--authorized-workers", str(self.workers_dir),
                "--authorized-clients", str(self.clients_dir))

    def client_flags(self, name: str, server: str = "broker") -> tuple[str, ...]:
        return ("--curve-server-key", self.public(server), "--curve-secret-key", self.secret(name))

    def client(self, endpoint: str, name: str | None, server: str = "broker") -> BrokerClient:
        curve = ClientKeys.load(self.public(server), self.secret(name)) if name else None
        return BrokerClient(endpoint, heartbeat_interval_s=0.2, curve=curve)


@pytest.fixture
def keys(tmp_path) -> Keys:
    return Keys(tmp_path)


@pytest.fixture
def secure(stack, keys):
    """A CURVE broker, an authorised worker serving "rev", and an authorised gateway client."""
    stack.start_broker(*HB, *keys.broker_flags())
    worker = stack.start_worker(*REV, *HB, *keys.client_flags("worker-a"))
    client = keys.client(stack.frontend, "gateway-a")
    wait_until(lambda: live_pids(client, timeout_s=1) == [worker.pid], 30, what="the authorised worker")
    yield worker, client
    client.close()



def _served_by(client: BrokerClient, count: int = 5) -> set[int]:
    outputs = client.request("rev", [f"x{n}" for n in range(count)], timeout_s=10)
    return {output["pid"] for output in outputs}


@pytest.mark.parametrize("attack", ["no key", "wrong server key", "unlisted key", "gateway key on worker port"])
def test_rogue_worker_gets_nothing(stack, keys, secure, attack):
    worker, client = secure
    flags = {
        "no key": (),
        "wrong server key": keys.client_flags("worker-a", server="other-broker"),
        "unlisted key": keys.client_flags("rogue"),
        "gateway key on worker port": keys.client_flags("gateway-a"),
    }[attack]
    rogue = stack.start_worker(*REV, *HB, *flags)
    rogue.wait_for_output(r"refused our handshake", timeout_s=20)
    assert live_pids(client, timeout_s=1) == [worker.pid], "the rogue must not register"
    assert _served_by(client) == {worker.pid}, "no request may reach the rogue"
    Tally(sent=1, notes={"attack": f"worker: {attack}", "got": "handshake refused; not registered"}).record(
        f"security: worker, {attack}")


@pytest.mark.parametrize("attack", ["no key", "wrong server key", "unlisted key", "worker key on frontend"])
def test_rogue_client_gets_nothing(stack, keys, secure, attack):
    worker, client = secure
    name, server = {
        "no key": (None, "broker"),
        "wrong server key": ("gateway-a", "other-broker"),
        "unlisted key": ("rogue", "broker"),
        "worker key on frontend": ("worker-a", "broker"),
    }[attack]
    items_before = client.status()["workers"][0]["items"]
    rogue = keys.client(stack.frontend, name, server)
    try:
        with pytest.raises(BrokerError) as caught:
            rogue.request("rev", ["from the rogue"], timeout_s=2)
        assert caught.value.code in (ErrorCode.UNAVAILABLE, ErrorCode.TIMEOUT)
        with pytest.raises(BrokerError):
            rogue.status(timeout_s=1)
    finally:
        rogue.close()
    assert client.status()["workers"][0]["items"] == items_before, "the rogue's request must reach no worker"
    Tally(sent=1, errors={caught.value.code.value: 1}, notes={"attack": f"client: {attack}"}).record(
        f"security: client, {attack}")


def test_revoked_worker_key_is_dropped_on_sighup(stack, keys, secure):
    worker_a, client = secure
    worker_b = stack.start_worker(*REV, *HB, *keys.client_flags("worker-b"))
    wait_until(lambda: live_pids(client, timeout_s=1) == sorted([worker_a.pid, worker_b.pid]), 30, what="both workers")
    broker = stack.processes[0]
    (keys.workers_dir / "worker-b.key").unlink()
    broker.signal(signal.SIGHUP)
    wait_until(lambda: live_pids(client, timeout_s=1) == [worker_a.pid], 10, what="the revoked worker to be dropped")
    assert _served_by(client, 20) == {worker_a.pid}
    assert worker_b.popen.poll() is None  # still connected and trying, but it gets nothing
    Tally(sent=1, notes={"attack": "worker key revoked + SIGHUP", "got": "dropped from the registry"}).record(
        "security: worker, revoked on SIGHUP")


def test_revoked_client_key_is_dropped_on_sighup(stack, keys, secure):
    worker, client = secure
    revoked = keys.client(stack.frontend, "gateway-b")
    try:
        assert _served_by(revoked) == {worker.pid}
        items_before = client.status()["workers"][0]["items"]
        (keys.clients_dir / "gateway-b.key").unlink()
        stack.processes[0].signal(signal.SIGHUP)
        wait_until(lambda: "reloaded keys" in stack.processes[0].output(), 10, what="the reload")
        with pytest.raises(BrokerError):
            revoked.request("rev", ["after revocation"], timeout_s=2)
        assert client.status()["workers"][0]["items"] == items_before
        assert client.status()["stats"]["refused_unauthorised"] >= 1
    finally:
        revoked.close()
    Tally(sent=1, notes={"attack": "client key revoked + SIGHUP", "got": "live connection's messages dropped"}
          ).record("security: client, revoked on SIGHUP")


def test_nothing_gets_in_when_the_authenticator_is_stopped(keys):
    context = zmq.Context()
    name = uuid.uuid4().hex
    config = BrokerConfig(frontend="tcp://127.0.0.1:0", backend="tcp://127.0.0.1:0",
                          curve_secret_key=keys.secret("broker"), authorized_workers=str(keys.workers_dir),
                          authorized_clients=str(keys.clients_dir))
    broker = Broker(config, context, instance_id=name)
    broker.bind()
    stop = threading.Event()
    loop = threading.Thread(target=broker.run, args=(stop.is_set,), daemon=True)
    loop.start()
    good = keys.client(broker.frontend_endpoint, "gateway-a")
    late = None
    try:
        assert good.status(timeout_s=5)["instance_id"] == name  # an authorised key gets in...
        broker.stop_authenticator()
        late = keys.client(broker.frontend_endpoint, "gateway-a")  # ...but not once ZAP is gone
        with pytest.raises(BrokerError) as caught:
            late.status(timeout_s=2)
        assert caught.value.code is ErrorCode.UNAVAILABLE
        # Nor may an authorised worker key register.
        worker = context.socket(zmq.DEALER)
        worker.setsockopt(zmq.LINGER, 0)
        ClientKeys.load(keys.public("broker"), keys.secret("worker-a")).apply(worker)
        worker.connect(broker.backend_endpoint)
        worker.send_multipart(protocol.encode(protocol.Ready(["rev"], 8)))  # queued: no handshake will succeed
        assert worker.poll(1000) == 0, "a refused worker hears nothing"
        assert good.status(timeout_s=5)["workers"] == [], "no worker may register"
        worker.close(linger=0)
    finally:
        good.close()
        if late is not None:
            late.close()
        stop.set()
        loop.join(5)
        broker.close()
        context.term()
    Tally(sent=1, notes={"attack": "authenticator stopped", "got": "handshake refused (fail closed)"}).record(
        "security: authenticator stopped")


def test_authorised_worker_in_another_namespace_serves_over_curve(netns, stack, keys):
    backend = f"tcp://{netns.host_ip}:{free_port()}"
    stack.start_broker(*HB, *keys.broker_flags(), backend=backend)
    remote = stack.start_worker(*REV, *HB, *keys.client_flags("worker-a"), prefix=netns.prefix)
    client = keys.client(stack.frontend, "gateway-a")
    try:
        wait_until(lambda: live_pids(client, timeout_s=1) == [remote.pid], 30, what="the remote worker over CURVE")
        assert client.request("rev", ["over the veth"], timeout_s=10)[0]["reversed"] == "over the veth"[::-1]
    finally:
        client.close()


def test_an_authorised_key_cannot_take_over_another_workers_identity(stack, keys, secure):
    """worker-b's key is authorised, but claiming worker-a's routing identity gets it nothing:
    the backend refuses a second connection under a live identity (no ROUTER_HANDOVER), and the
    broker binds each worker to the key it registered with."""
    worker, client = secure
    [victim] = client.status(timeout_s=5)["workers"]
    context = zmq.Context()
    impostor = context.socket(zmq.DEALER)
    impostor.setsockopt(zmq.LINGER, 0)
    impostor.setsockopt(zmq.IDENTITY, bytes.fromhex(victim["worker_id"]))
    ClientKeys.load(keys.public("broker"), keys.secret("worker-b")).apply(impostor)
    try:
        impostor.connect(stack.backend)
        impostor.send_multipart(protocol.encode(protocol.Ready(["rev"], 8)), zmq.NOBLOCK)
        assert _served_by(client, count=20) == {worker.pid}, "requests must keep going to the real worker"
        received = []
        while impostor.poll(300):
            received.append(type(protocol.decode(impostor.recv_multipart())).__name__)
        assert "Batch" not in received, f"the impostor must get no batch, got {received}"
        [still] = client.status(timeout_s=5)["workers"]
        assert (still["worker_id"], still["pid"]) == (victim["worker_id"], worker.pid)
    finally:
        impostor.close(linger=0)
        context.term()
