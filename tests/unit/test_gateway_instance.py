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
from gateway.links import UNKNOWN_RETRY_MAX_S, Change, Links
from gateway.requests import CONNECT_GRACE_S, Fail, Requests, Send

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


# ---------------------------------------------------------------- a lone broker's first requests wait for its instance


def record_sends(sent: list[Send]):
    def send(instruction: Send) -> bool:
        sent.append((instruction.request_id, instruction.message.instance_id))
        return True
    return send


def a_request(request_id: str = "r1") -> protocol.Request:
    return protocol.Request(request_id, "m", timeout_ms=90_000, inputs=[b"x"])


def test_a_lone_brokers_first_request_waits_for_its_instance_then_a_restart_fails_it_at_once():
    """test_continuous.py's test_a_pass_from_before_a_broker_restart... ended TIMEOUT, not UNAVAILABLE, 2 of
    11 runs: a fresh client's request went out before its first heartbeat's answer, untagged, and the broker
    restarted before that answer came. Now it waits for the instance (a heartbeat round trip, at start)."""
    links, requests, sent = fresh_client()
    send = record_sends(sent)
    requests.submit("r1", a_request(), 90.0, now=0.0)
    assert requests.flush(send, 0.0) == [] and sent == [] and requests.unsent() and requests.awaits_instance()
    deliver(heartbeat("old"), 0, links, requests, now=0.01)
    assert not requests.awaits_instance()
    assert requests.flush(send, 0.01) == [] and sent == [("r1", "old")] and not requests.unsent()

    deliver(heartbeat("new"), 0, links, requests, now=1.0)
    requests.links_changed(1.0)
    requests.tick(1.0 + SILENT_AFTER_S)
    [outcome] = requests.flush(send, 1.0 + SILENT_AFTER_S)
    assert type(outcome) is Fail and outcome.code is ErrorCode.UNAVAILABLE, outcome


def test_with_no_instance_named_within_the_connect_grace_the_request_goes_untagged_as_before():
    links, requests, sent = fresh_client()
    send = record_sends(sent)
    requests.submit("r1", a_request(), 90.0, now=0.0)
    assert requests.flush(send, CONNECT_GRACE_S - 0.001) == [] and sent == []
    assert requests.next_wake_at() == CONNECT_GRACE_S  # (the shell looks again by then)
    assert requests.flush(send, CONNECT_GRACE_S) == [] and sent == [("r1", "")]


def test_only_a_lone_brokers_requests_wait_not_status_asks_nor_several_brokers():
    links, requests, sent = fresh_client()
    requests.ask("s1", protocol.StatusRequest("s1"), 0, 2.0, now=0.0)
    requests.flush(lambda instruction: sent.append(instruction.request_id) or True, 0.0)
    assert sent == ["s1"]  # its answer names the instance too

    links = Links(["tcp://b0:5555", "tcp://b1:5555"], SILENT_AFTER_S)
    links.started(0.0)
    requests, sent = Requests(links, restart_grace_s=SILENT_AFTER_S), []
    requests.submit("r1", a_request(), 90.0, now=0.0)
    assert not requests.awaits_instance()
    requests.flush(record_sends(sent), 0.0)
    assert sent == [("r1", "")]  # a dropped connection fails over (the DEALERs' monitors)


def test_a_silent_lone_broker_is_sent_to_untagged_as_before():
    links, requests, sent = fresh_client()
    assert links.silent(SILENT_AFTER_S + 0.1) == [0]
    requests.submit("r1", a_request(), 90.0, now=SILENT_AFTER_S + 0.2)
    requests.flush(record_sends(sent), SILENT_AFTER_S + 0.2)
    assert sent == [("r1", "")]


def test_heartbeats_to_a_broker_never_heard_retry_at_least_every_unknown_retry_max_s():
    links = Links(["tcp://b0:5555"], SILENT_AFTER_S, heartbeat_interval_s=1.0)
    waits, now = [], 0.0
    for _ in range(6):
        links.heartbeat_sent(0, False, now)
        waits.append(round(links[0].heartbeat_due_at - now, 3))
        now = links[0].heartbeat_due_at
    assert waits == [0.02, 0.04, 0.08, UNKNOWN_RETRY_MAX_S, UNKNOWN_RETRY_MAX_S, UNKNOWN_RETRY_MAX_S]
    links.heartbeat(0, "i0", now)  # heard: a later unreachable spell backs off to the interval
    for _ in range(7):
        links.heartbeat_sent(0, False, now)
        now = links[0].heartbeat_due_at
    assert links[0].heartbeat_retry_s == 1.0

    several = Links(["tcp://b0:5555", "tcp://b1:5555"], SILENT_AFTER_S, heartbeat_interval_s=1.0)
    for _ in range(7):
        several.heartbeat_sent(1, False, 0.0)
    assert several[1].heartbeat_retry_s == 1.0  # no request waits for several brokers' instances
