"""How a gateway learns which broker instance it talks to (gateway/dealers.py's deliver, gateway/links.py),
and why it matters: a restart is told only by a new instance id, so a client that never learned the
old one cannot tell a restart from its first contact, and a request the old instance held then
waits out its whole deadline instead of failing UNAVAILABLE at once.

No sockets, no sleeps: the frames a broker would send, handed to deliver() by hand.
"""

from __future__ import annotations

from ddml_common import protocol
from ddml_common.protocol import ErrorCode
from gateway.dealers import deliver
from gateway.links import Change, Links
from gateway.requests import Fail, Requests, Send

SILENT_AFTER_S = 3.0


def fresh_client() -> tuple[Links, Requests, list[Send]]:
    """A client that has connected but heard nothing yet: its first heartbeat is still unanswered."""
    links = Links(["tcp://b0:5555"], SILENT_AFTER_S)
    links.started(0.0)
    sent: list[Send] = []
    return links, Requests(links, restart_grace_s=SILENT_AFTER_S), sent


def status(request_id: str, instance_id: str) -> list[bytes]:
    return protocol.encode(protocol.Status(request_id, instance_id, models={}, workers=[], stats={}))


def heartbeat(instance_id: str) -> list[bytes]:
    return protocol.encode(protocol.Heartbeat(instance_id))


def test_a_status_answer_names_the_instance_so_that_a_restart_heard_next_fails_the_request_it_held():
    """The CI flake of test_chaos.py's test_waiting_request_wakes_on_the_alarm...[restart]: the client's
    first exchange was a status (its first heartbeat could not go before the connection, and its retry
    came after the status), the request went, and the broker was killed before any heartbeat answer."""
    links, requests, sent = fresh_client()
    requests.ask("s1", protocol.StatusRequest("s1"), 0, 2.0, now=0.0)
    requests.flush(lambda send: sent.append(send) or True, 0.0)
    deliver(status("s1", "old"), 0, links, requests, now=0.01)
    assert [type(o).__name__ for o in requests.flush(lambda send: True, 0.01)] == ["Resolve"]
    assert links[0].instance_id == "old"

    requests.submit("r1", protocol.Request("r1", "m", timeout_ms=90_000, inputs=[b"x"]), 90.0, now=0.02)
    requests.flush(lambda send: sent.append(send) or True, 0.02)
    assert sent[-1].message.instance_id == "old", "the request names the instance it is for"

    changes = links.changes
    deliver(heartbeat("new"), 0, links, requests, now=1.0)  # the restarted broker answers a heartbeat
    assert links.changes == changes + 1 and links[0].change is Change.RESTARTED
    requests.links_changed(1.0)
    requests.tick(1.0 + SILENT_AFTER_S)
    [outcome] = requests.flush(lambda send: True, 1.0 + SILENT_AFTER_S)
    assert type(outcome) is Fail and outcome.code is ErrorCode.UNAVAILABLE, outcome


def test_a_status_from_the_same_instance_as_its_heartbeats_changes_nothing():
    links, requests, _ = fresh_client()
    deliver(heartbeat("one"), 0, links, requests, now=0.0)
    changes = links.changes
    deliver(status("s1", "one"), 0, links, requests, now=0.5)
    assert links.changes == changes and links[0].up and links[0].epoch == 0


def test_a_status_from_a_new_instance_is_a_restart_as_a_heartbeat_would_be():
    links, requests, _ = fresh_client()
    deliver(heartbeat("one"), 0, links, requests, now=0.0)
    deliver(status("s1", "two"), 0, links, requests, now=0.5)
    assert links[0].change is Change.RESTARTED and links[0].instance_id == "two" and links[0].epoch == 1


def test_a_status_brings_a_silent_broker_back_up():
    links, requests, _ = fresh_client()
    deliver(heartbeat("one"), 0, links, requests, now=0.0)
    assert links.silent(SILENT_AFTER_S + 0.1) == [0] and not links[0].up
    deliver(status("s1", "one"), 0, links, requests, now=SILENT_AFTER_S + 0.2)
    assert links[0].up and links[0].tag() == "one"

