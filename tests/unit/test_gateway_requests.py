"""gateway/requests.py and gateway/links.py: a request's lifetime, events in and instructions out.

No sockets, no threads, no sleeps: a `send` that records (and refuses where a test says), and the
time passed in by hand.
"""

from __future__ import annotations

import pytest

from ddml_common import protocol
from ddml_common.protocol import ErrorCode
from gateway.links import Change, Links
from gateway.requests import ALL_DOWN_RETRY_AFTER_S, CONNECT_GRACE_S, REPLY_GRACE_S, Fail, Requests, Resolve, Send

SILENT_AFTER_S = 3.0


class Wire:
    """The shell's send: records every instruction; refuses those to brokers in `refusing`."""

    def __init__(self):
        self.sent: list[Send] = []
        self.refusing: set[int] = set()

    def __call__(self, instruction: Send) -> bool:
        if instruction.broker in self.refusing:
            return False
        # the core reuses its message for a resend: keep what this send carried
        message = instruction.message
        self.sent.append((instruction.request_id, instruction.broker, getattr(message, "instance_id", None),
                          getattr(message, "timeout_ms", None)))
        return True


def machine(brokers: int = 1) -> tuple[Links, Requests, Wire]:
    links = Links([f"tcp://b{i}:5555" for i in range(brokers)], SILENT_AFTER_S)
    links.started(0.0)
    for index in range(brokers):
        links.heartbeat(index, f"i{index}", 0.0)
    return links, Requests(links, restart_grace_s=SILENT_AFTER_S), Wire()


def request(request_id: str = "r1") -> protocol.Request:
    return protocol.Request(request_id, "m", timeout_ms=2000, inputs=[b"x"])


def ok(request_id: str = "r1") -> protocol.Reply:
    return protocol.Reply(request_id, [b"y"])


def refused(request_id: str = "r1", code: ErrorCode = ErrorCode.UNAVAILABLE) -> protocol.Reply:
    return protocol.Reply(request_id, error_code=code.value, error_message="no")


def test_a_request_goes_to_the_first_broker_with_its_instance_and_is_resolved_by_its_reply():
    links, requests, wire = machine(brokers=2)
    requests.submit("r1", request(), timeout_s=2.0, now=10.0)
    assert requests.flush(wire, 10.0) == []
    assert wire.sent == [("r1", 0, "i0", 2000)]
    requests.reply(0, ok(), 10.5)
    [outcome] = requests.flush(wire, 10.5)
    assert outcome == Resolve("r1", ok())
    assert len(requests) == 0 and requests.counts.replies == 1


def test_a_request_that_no_broker_takes_waits_for_a_connection_then_fails_unavailable():
    links, requests, wire = machine(brokers=2)
    wire.refusing = {0, 1}
    requests.submit("r1", request(), timeout_s=5.0, now=0.0)
    assert requests.flush(wire, 0.5) == [] and requests.unsent()
    wire.refusing = {0}
    assert requests.flush(wire, 0.6) == []  # the second broker connected: it takes it
    assert wire.sent == [("r1", 1, "i1", 4400)] and not requests.unsent()

    requests.submit("r2", request("r2"), timeout_s=5.0, now=1.0)
    wire.refusing = {0, 1}
    assert requests.flush(wire, 1.0 + CONNECT_GRACE_S - 0.001) == []
    [outcome] = requests.flush(wire, 1.0 + CONNECT_GRACE_S)
    assert outcome.request_id == "r2" and outcome.code is ErrorCode.UNAVAILABLE
    assert outcome.retry_after_s == ALL_DOWN_RETRY_AFTER_S


def test_several_brokers_a_request_held_by_one_that_dies_goes_to_the_other_with_what_is_left():
    links, requests, wire = machine(brokers=2)
    requests.submit("r1", request(), timeout_s=2.0, now=0.0)
    requests.flush(wire, 0.0)
    assert links.disconnected(0, now=0.5)
    requests.links_changed(0.5)
    assert requests.flush(wire, 0.5) == []
    assert wire.sent[-1] == ("r1", 1, "i1", 1500) and requests.counts.resent == 1
    requests.reply(1, ok(), 0.7)
    assert requests.flush(wire, 0.7) == [Resolve("r1", ok())]
    requests.reply(0, ok(), 0.8)  # the first broker was alive after all: its late reply is a duplicate
    assert requests.flush(wire, 0.8) == []
    assert requests.counts.duplicate_replies == 1 and requests.counts.unmatched_replies == 0


def test_several_brokers_unavailable_from_one_is_retried_on_the_next_and_final_from_the_last():
    links, requests, wire = machine(brokers=2)
    requests.submit("r1", request(), timeout_s=2.0, now=0.0)
    requests.flush(wire, 0.0)
    requests.reply(0, refused(), 0.1)
    assert requests.flush(wire, 0.1) == []
    assert [s[1] for s in wire.sent] == [0, 1]
    requests.reply(1, refused(), 0.2)
    assert requests.flush(wire, 0.2) == [Resolve("r1", refused())]


def test_several_brokers_other_errors_are_final_at_once():
    links, requests, wire = machine(brokers=2)
    requests.submit("r1", request(), timeout_s=2.0, now=0.0)
    requests.flush(wire, 0.0)
    requests.reply(0, refused(code=ErrorCode.MODEL_ERROR), 0.1)
    assert requests.flush(wire, 0.1) == [Resolve("r1", refused(code=ErrorCode.MODEL_ERROR))]
    assert len(wire.sent) == 1


def test_several_brokers_all_down_fails_what_they_held_as_unreachable():
    links, requests, wire = machine(brokers=2)
    requests.submit("r1", request(), timeout_s=2.0, now=0.0)
    requests.flush(wire, 0.0)
    wire.refusing = {0, 1}
    links.disconnected(0, 0.3)
    links.disconnected(1, 0.3)
    requests.links_changed(0.3)
    [outcome] = requests.flush(wire, 0.3)
    assert type(outcome) is Fail and outcome.code is ErrorCode.UNAVAILABLE
    assert "no broker of tcp://b0:5555,tcp://b1:5555 is reachable" == outcome.message


def test_one_broker_that_falls_silent_fails_what_it_held_and_nothing_else():
    links, requests, wire = machine(brokers=1)
    requests.submit("r1", request(), timeout_s=10.0, now=0.0)
    requests.flush(wire, 0.0)
    assert links.silent(now=SILENT_AFTER_S) == [] and links.silent(now=SILENT_AFTER_S + 0.1) == [0]
    assert links[0].change is Change.SILENT and not links[0].up
    requests.submit("r2", request("r2"), timeout_s=10.0, now=3.2)  # after the silence: not lost
    requests.links_changed(3.2)
    assert requests.flush(wire, 3.2) == [Fail("r1", ErrorCode.UNAVAILABLE, "broker tcp://b0:5555 stopped answering")]
    assert "r2" in requests and len(wire.sent) == 2  # one broker: nothing is resent


def test_one_broker_that_restarts_awaits_its_refusal_briefly_then_fails_unavailable():
    links, requests, wire = machine(brokers=1)
    for name in ("r1", "r2"):
        requests.submit(name, request(name), timeout_s=60.0, now=0.0)
    requests.flush(wire, 0.0)
    assert links.heartbeat(0, "i0-new", now=1.0)
    assert links[0].change is Change.RESTARTED and links[0].up and links[0].instance_id == "i0-new"
    requests.links_changed(1.0)
    requests.reply(0, refused("r1"), 1.1)  # the new instance refused what reached it
    assert requests.flush(wire, 1.1) == [Resolve("r1", refused("r1"))]
    requests.tick(1.0 + SILENT_AFTER_S - 0.001)
    assert requests.flush(wire, 3.9) == []
    requests.tick(1.0 + SILENT_AFTER_S)
    assert requests.flush(wire, 4.0) == [Fail("r2", ErrorCode.UNAVAILABLE,
                                              "broker restarted while the request was in flight")]
    assert requests.counts.expired_locally == 0


def test_a_request_no_broker_answers_times_out_after_its_grace_and_a_late_reply_is_unmatched():
    links, requests, wire = machine(brokers=1)
    requests.submit("r1", request(), timeout_s=2.0, now=0.0)
    requests.flush(wire, 0.0)
    assert requests.next_wake_at() == 2.0 + REPLY_GRACE_S
    requests.tick(2.0 + REPLY_GRACE_S - 0.001)
    assert requests.flush(wire, 2.9) == []
    requests.tick(2.0 + REPLY_GRACE_S)
    assert requests.flush(wire, 3.0) == [Fail("r1", ErrorCode.TIMEOUT, "no reply before the deadline")]
    assert requests.counts.expired_locally == 1
    requests.reply(0, ok(), 3.5)
    assert requests.flush(wire, 3.5) == [] and requests.counts.unmatched_replies == 1


def test_a_resend_after_the_deadline_is_not_made():
    links, requests, wire = machine(brokers=2)
    requests.submit("r1", request(), timeout_s=1.0, now=0.0)
    requests.flush(wire, 0.0)
    links.disconnected(0, 1.2)
    requests.links_changed(1.2)
    [outcome] = requests.flush(wire, 1.2)
    assert outcome.code is ErrorCode.UNAVAILABLE and len(wire.sent) == 1


def test_a_status_request_goes_to_its_broker_only_and_fails_at_once_if_that_broker_is_down():
    links, requests, wire = machine(brokers=2)
    requests.ask("s1", protocol.StatusRequest("s1"), broker=1, wait_s=2.0, now=0.0)
    requests.flush(wire, 0.0)
    assert [s[:2] for s in wire.sent] == [("s1", 1)]
    status = protocol.Status("s1", "i1", {}, [])
    requests.reply(0, ok("s1"), 0.1)  # a Reply is no answer to a status request
    requests.reply(1, status, 0.1)
    assert requests.flush(wire, 0.1) == [Resolve("s1", status)]
    links.disconnected(1, 0.2)
    requests.ask("s2", protocol.StatusRequest("s2"), broker=1, wait_s=2.0, now=0.3)
    assert requests.flush(wire, 0.3) == [Fail("s2", ErrorCode.UNAVAILABLE, "broker tcp://b1:5555 is down")]


def test_a_status_request_held_by_a_broker_that_goes_down_fails_and_a_late_one_times_out():
    links, requests, wire = machine(brokers=2)
    requests.ask("s1", protocol.StatusRequest("s1"), broker=0, wait_s=2.0, now=0.0)
    requests.ask("s2", protocol.StatusRequest("s2"), broker=1, wait_s=2.0, now=0.0)
    requests.flush(wire, 0.0)
    links.disconnected(0, 0.5)
    requests.links_changed(0.5)
    assert requests.flush(wire, 0.5) == [Fail("s1", ErrorCode.UNAVAILABLE, "broker tcp://b0:5555 disconnected")]
    requests.tick(2.0)
    assert requests.flush(wire, 2.0) == [Fail("s2", ErrorCode.TIMEOUT, "no reply before the deadline")]
    assert requests.counts.expired_locally == 0  # status requests are not requests the broker lost


def test_links_a_broker_back_after_silence_is_up_again_without_a_new_epoch():
    links = Links(["tcp://b0:5555"], SILENT_AFTER_S)
    links.started(0.0)
    assert not links.heartbeat(0, "i0", 0.5)  # the first instance id it hears is no change
    assert links.silent(4.0) == [0] and links[0].epoch == 1
    assert links.heartbeat(0, "i0", 4.5) and links[0].up and links[0].epoch == 1
    assert links.disconnected(0, 4.6) and links[0].change is Change.DISCONNECTED  # up: a dropped connection takes it down
    assert not links.disconnected(0, 4.7)  # already down
    assert links.changes == 3 and links.next_silent_at() == pytest.approx(4.5 + SILENT_AFTER_S)


def test_fail_all_ends_every_request_once():
    links, requests, wire = machine(brokers=1)
    requests.submit("r1", request(), timeout_s=2.0, now=0.0)
    requests.submit("r2", request("r2"), timeout_s=2.0, now=0.0)
    wire.refusing = {0}
    requests.flush(wire, 0.0)
    requests.fail_all(ErrorCode.UNAVAILABLE, "closed")
    outcomes = requests.flush(wire, 0.1)
    assert [o.request_id for o in outcomes] == ["r1", "r2"] and len(requests) == 0 and not requests.unsent()


def test_a_request_to_a_broker_known_down_carries_no_instance_id_and_its_new_instance_serves_it():
    """Regression (tests/sim/test_regressions.py, lone broker silent then restarted): tagged with the
    old instance's id, such a request was refused unrun by the new instance, a needless 503."""
    links, requests, wire = machine(brokers=1)
    assert links.silent(now=SILENT_AFTER_S + 0.1) == [0]
    requests.submit("r1", request(), timeout_s=5.0, now=4.0)
    requests.flush(wire, 4.0)
    assert wire.sent == [("r1", 0, "", 5000)]
    assert links.heartbeat(0, "i0-new", now=4.1)  # back, as a new instance
    assert links[0].up and links[0].instance_id == "i0-new" and links[0].epoch == 1  # no new epoch:
    requests.links_changed(4.1)  # nothing it holds was lost
    requests.tick(4.1 + SILENT_AFTER_S + 1.0)
    requests.reply(0, ok(), 8.5)
    assert requests.flush(wire, 8.5) == [Resolve("r1", ok())]
    requests.submit("r2", request("r2"), timeout_s=5.0, now=9.0)
    requests.flush(wire, 9.0)
    assert wire.sent[-1] == ("r2", 0, "i0-new", 5000)  # up again: tagged again


def test_a_broker_that_refused_a_request_unavailable_is_not_sent_it_again():
    """Regression (sim seed 0): the untried broker takes nothing (not connected yet), and the resend
    went back to the broker that had just refused it, again after each refusal."""
    links, requests, wire = machine(brokers=2)
    wire.refusing = {1}
    requests.submit("r1", request(), timeout_s=2.0, now=0.0)
    requests.flush(wire, 0.0)
    requests.reply(0, refused(), 0.1)
    assert requests.flush(wire, 0.1) == [Resolve("r1", refused())]
    assert [s[1] for s in wire.sent] == [0]


def test_several_brokers_a_restarted_broker_gets_no_second_copy_until_it_refuses_the_first():
    """Regression (sim seed 112): with the other broker unreachable, a request the restarted broker
    held was resent to it at once, a second copy beside the first; the new instance's refusal of
    the first (unrun) then ended the request UNAVAILABLE while the second ran for nothing."""
    links, requests, wire = machine(brokers=2)
    wire.refusing = {1}
    requests.submit("r1", request(), timeout_s=5.0, now=0.0)
    requests.flush(wire, 0.0)
    assert links.heartbeat(0, "i0-new", now=1.0)
    requests.links_changed(1.0)
    assert requests.flush(wire, 1.0) == [] and len(wire.sent) == 1  # no second copy yet
    requests.reply(0, refused(), 1.1)  # the old copy, refused unrun by the new instance
    assert requests.flush(wire, 1.1) == []
    assert wire.sent[-1] == ("r1", 0, "i0-new", 3900)  # now the one copy there
    requests.reply(0, ok(), 1.5)
    assert requests.flush(wire, 1.5) == [Resolve("r1", ok())]


def test_several_brokers_a_restarted_broker_that_never_refuses_the_old_copy_gets_it_after_the_grace():
    links, requests, wire = machine(brokers=2)
    wire.refusing = {1}
    requests.submit("r1", request(), timeout_s=10.0, now=0.0)
    requests.flush(wire, 0.0)
    links.heartbeat(0, "i0-new", now=1.0)
    requests.links_changed(1.0)
    requests.tick(1.0 + SILENT_AFTER_S - 0.001)
    assert requests.flush(wire, 3.9) == [] and len(wire.sent) == 1
    requests.tick(1.0 + SILENT_AFTER_S)  # the old copy died with the old instance
    assert requests.flush(wire, 4.0) == [] and wire.sent[-1][:3] == ("r1", 0, "i0-new")


def test_heartbeats_retry_soon_until_one_goes_through_backing_off_to_the_interval():
    links = Links(["tcp://b0:5555", "tcp://b1:5555"], SILENT_AFTER_S, heartbeat_interval_s=1.0)
    assert links.heartbeats_due(0.0) == [0, 1]
    links.heartbeat_sent(0, True, 0.0)
    waits = []
    now = 0.0
    for _ in range(8):
        links.heartbeat_sent(1, False, now)
        waits.append(round(links[1].heartbeat_due_at - now, 3))
        now = links[1].heartbeat_due_at
    assert waits == [0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.0, 1.0]
    assert links.heartbeats_due(0.5) == [] and links.next_heartbeat_at() == 1.0
    links.heartbeat_sent(1, True, now)
    links.heartbeat_sent(1, False, now + 1.0)
    assert links[1].heartbeat_due_at == pytest.approx(now + 1.02)  # a success starts the backoff again


def test_links_of_a_broker_string_name_each_endpoint_and_fall_silent_after_liveness_intervals():
    links = Links.of(" tcp://a:5555, tcp://b:5555,", heartbeat_interval_s=0.5, liveness=4)
    assert links.endpoints == ["tcp://a:5555", "tcp://b:5555"] and [link.index for link in links] == [0, 1]
    assert links.silent_after_s == 2.0 and links.heartbeat_interval_s == 0.5
    links.started(0.0)
    assert links.silent(1.9) == [] and links.silent(2.1) == [0, 1]
    with pytest.raises(ValueError, match="at least one broker"):
        Links.of(" , ", heartbeat_interval_s=1.0, liveness=3)


# --------------------------------------------------------------------------- requests sent together


class TogetherWire(Wire):
    """The shell's send_together as well: records each list a broker took, as one message."""

    def __init__(self):
        super().__init__()
        self.lists: list[tuple[int, list[str]]] = []

    def together(self, broker: int, sends: list[Send]) -> bool:
        assert sends and all(s.broker == broker and type(s.message) is protocol.Request for s in sends)
        if broker in self.refusing:
            return False
        for instruction in sends:
            self(instruction)
        self.lists.append((broker, [s.request_id for s in sends]))
        return True


def test_the_requests_of_one_flush_go_to_each_broker_together_in_order_and_status_requests_alone():
    links, requests, _ = machine(brokers=2)
    wire = TogetherWire()
    for request_id in ("r1", "r2", "r3"):
        requests.submit(request_id, request(request_id), timeout_s=2.0, now=0.0)
    requests.ask("s1", protocol.StatusRequest("s1"), 1, 2.0, 0.0)
    assert requests.flush(wire, 0.0, wire.together) == []
    assert wire.lists == [(0, ["r1", "r2", "r3"])]
    assert sorted(wire.sent, key=repr) == [("r1", 0, "i0", 2000), ("r2", 0, "i0", 2000), ("r3", 0, "i0", 2000),
                                           ("s1", 1, None, None)]
    for request_id in ("r1", "r2", "r3"):
        requests.reply(0, ok(request_id), 0.1)
    assert [o.request_id for o in requests.flush(wire, 0.1, wire.together)] == ["r1", "r2", "r3"]


def test_a_list_one_broker_does_not_take_goes_on_to_the_next_and_with_none_waits_for_a_connection():
    links, requests, _ = machine(brokers=2)
    wire = TogetherWire()
    wire.refusing = {0}
    for request_id in ("r1", "r2"):
        requests.submit(request_id, request(request_id), timeout_s=2.0, now=0.0)
    requests.flush(wire, 0.0, wire.together)
    assert wire.lists == [(1, ["r1", "r2"])] and not requests.unsent()
    wire.refusing = {0, 1}
    requests.submit("r3", request("r3"), timeout_s=2.0, now=0.1)
    assert requests.flush(wire, 0.1, wire.together) == [] and requests.unsent()
    [outcome] = requests.flush(wire, 0.1 + CONNECT_GRACE_S, wire.together)
    assert (outcome.request_id, outcome.code) == ("r3", ErrorCode.UNAVAILABLE)


def test_a_list_holds_at_most_max_together_requests_and_about_together_bytes_of_inputs():
    from gateway.requests import MAX_TOGETHER, TOGETHER_BYTES

    links, requests, _ = machine()
    wire = TogetherWire()
    for n in range(MAX_TOGETHER + 1):
        requests.submit(f"r{n}", request(f"r{n}"), timeout_s=2.0, now=0.0)
    big = protocol.Request("big", "m", 2000, inputs=[bytes(TOGETHER_BYTES)])
    requests.submit("big", big, timeout_s=2.0, now=0.0)
    requests.flush(wire, 0.0, wire.together)
    assert [len(ids) for _, ids in wire.lists] == [MAX_TOGETHER, 1, 1] and wire.lists[2][1] == ["big"]


@pytest.mark.parametrize("seed", range(60))
def test_sending_together_decides_exactly_as_sending_one_by_one(seed):
    """The same events, to two machines: one flushed one request at a time, one with send_together. Each
    flush sends the same requests to the same brokers with the same tags, and ends the same ones."""
    import random

    rng = random.Random(seed)
    brokers = rng.choice((1, 2, 3))
    machines = [machine(brokers) for _ in range(2)]
    wires = [Wire(), TogetherWire()]
    now, serial = 0.0, 0
    for _ in range(60):
        now += rng.choice((0.0, 0.01, 0.3, 1.2))
        draw = rng.random()
        refusing = {b for b in range(brokers) if rng.random() < 0.3}
        for wire in wires:
            wire.refusing = refusing
        for (links, requests, _), wire in zip(machines, wires):
            r = random.Random(f"{seed}-{serial}")
            if draw < 0.45:
                for n in range(r.randint(1, 4)):
                    request_id = f"r{serial}-{n}"
                    requests.submit(request_id, request(request_id), timeout_s=r.choice((0.5, 2.0)), now=now)
            elif draw < 0.55:
                requests.ask(f"s{serial}", protocol.StatusRequest(f"s{serial}"), r.randrange(brokers), 1.0, now)
            elif draw < 0.75:
                waiting = sorted(requests._records)
                if waiting:
                    request_id = r.choice(waiting)
                    record = requests._records[request_id]
                    broker = min(record.waiting, default=0)
                    answer = (protocol.Status(request_id, "i", {}, []) if record.only is not None
                              else refused(request_id) if r.random() < 0.4 else ok(request_id))
                    requests.reply(broker, answer, now)
            elif draw < 0.85:
                broker = r.randrange(brokers)
                links.disconnected(broker, now)
                requests.links_changed(now)
            elif draw < 0.92:
                broker = r.randrange(brokers)
                links.heartbeat(broker, f"i{broker}-{serial}", now)  # restarted, or back
                requests.links_changed(now)
            else:
                requests.tick(now)
        serial += 1
        before = [len(wire.sent) for wire in wires]
        flushed = [machines[0][1].flush(wires[0], now), machines[1][1].flush(wires[1], now, wires[1].together)]
        assert sorted(map(repr, flushed[0])) == sorted(map(repr, flushed[1]))
        assert sorted(wires[0].sent[before[0]:], key=repr) == sorted(wires[1].sent[before[1]:], key=repr)
        assert machines[0][1].counts == machines[1][1].counts
