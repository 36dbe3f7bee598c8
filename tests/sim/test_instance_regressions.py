"""Named regression scenarios (as in test_regressions.py): a gateway that has not yet heard which
broker instance it talks to when the lone broker restarts.

A restart is told only by a new instance id, so a gateway must know the old one: a request sent
before the gateway's first heartbeat was answered went untagged, and when the broker crashed
holding it, the new instance's heartbeat looked like first contact. The request then waited out
its whole deadline, and ended TIMEOUT instead of UNAVAILABLE at once (test_continuous.py's
test_a_pass_from_before_a_broker_restart... saw it 2 of 11 runs, and test_chaos.py's
test_waiting_request_wakes_on_the_alarm...[restart] in CI).
"""

from __future__ import annotations

from ddml_common.protocol import ErrorCode
from gateway.requests import Fail
from tests.sim.test_regressions import HEARTBEAT, gateway, make_world, worker  # noqa: F401 (make_world: a fixture)


def test_a_fresh_gateways_first_request_fails_unavailable_soon_when_the_broker_restarts_before_it_heard_a_heartbeat(
        make_world):
    world = make_world(max_attempts=2)
    worker(world, batch_s=5.0)
    world.run_until(world.now + 0.1)
    client = gateway(world)  # its connection comes up a moment later, and its first heartbeat with it
    held = client.submit(count=1, timeout_s=20.0, model="m")
    world.run_until(world.now + 1.0, lambda: held.key is not None)
    assert held.key is not None, "the broker read it"
    assert held.instance_id, "a lone broker's first request waits until the gateway knows its instance"
    world.restart_broker(down_s=0.1)  # back well within the gateway's silence window: told by its new id
    world.run_until(world.now + 10.0, lambda: held.request_id in client.outcomes)
    outcome = client.outcomes.get(held.request_id)
    assert type(outcome) is Fail and outcome.code is ErrorCode.UNAVAILABLE, outcome
    assert world.now < world.broker_up_at + 2 * HEARTBEAT.expiry_s, "failed at once, not at the 20 s deadline"
    world.wind_down()
