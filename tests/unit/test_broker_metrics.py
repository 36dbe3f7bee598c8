"""The broker's /metrics: the core's plain figures, rendered from one snapshot in Prometheus format."""

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from broker.config import BrokerConfig, HeartbeatConfig
from broker.core import BrokerCore, Peer, Send
from broker.metrics import BrokerMetrics
from broker.stats import ModelStats
from ddml_common import protocol


def samples(metrics: BrokerMetrics) -> dict:
    text = generate_latest(metrics.registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_batch_size_histogram_is_cumulative_and_inclusive_of_its_bound():
    stats = ModelStats()
    for value in (1, 2, 3, 64, 1000):
        stats.record_dispatch(value)
    [figures] = stats.histograms().values()
    cumulative = [sum(figures.counts[: i + 1]) for i in range(len(figures.counts))]
    bounds = dict(zip((*figures.bounds, "+Inf"), cumulative))
    assert [bounds[1], bounds[2], bounds[4], bounds[64], bounds[512], bounds["+Inf"]] == [1, 2, 3, 4, 4, 5]
    assert figures.count == 5 and figures.sum == 1070


def test_seconds_histograms_count_each_observation_in_the_first_bucket_at_or_above_it():
    stats = ModelStats()
    for value in (0.0005, 0.0006, 100.0):
        stats.queue_wait.observe(value)
    figures = stats.histograms()["queue_wait_seconds"]
    assert figures.counts[0] == 1 and figures.counts[1] == 1 and figures.counts[-1] == 1
    assert "batch_latency_seconds" not in stats.histograms()  # nothing observed: no series


class Wire:
    def __init__(self):
        self.sent: list[Send] = []

    def __call__(self, instruction: Send) -> bool:
        self.sent.append(instruction)
        return True


def test_metrics_render_the_snapshot_the_core_describes_and_do_not_move_until_the_next_one():
    core, wire = BrokerCore(BrokerConfig(heartbeat=HeartbeatConfig(interval_s=1.0)), "i1", now=0.0), Wire()
    metrics = BrokerMetrics()
    core.on_frames(Peer.WORKER, b"w1", protocol.encode(protocol.Ready(["m"], max_batch_size=4)), 0.0)
    for n in range(3):
        core.on_frames(Peer.GATEWAY, b"gw", protocol.encode(protocol.Request(
            f"r{n}", "m", 5000, inputs=[protocol.encode_value(n)])), 0.0)
    core.on_frames(Peer.GATEWAY, b"gw", [b"garbage"], 0.0)
    core.on_tick(0.0)
    core.flush(wire, 0.0)
    [batch] = [s.message for s in wire.sent if isinstance(s.message, protocol.Batch)]
    core.on_frames(Peer.WORKER, b"w1", protocol.encode(protocol.BatchResult(
        batch.batch_id, batch.inputs[:2] + [b""], errors=[protocol.InputFailure(2, "MODEL_ERROR", "no")])), 0.25)
    core.flush(wire, 0.25)

    metrics.publish(core.describe(0.5))
    got = samples(metrics)
    assert got[("ddml_requests_total", (("model", "m"), ("outcome", "ok")))] == 2
    assert got[("ddml_requests_total", (("model", "m"), ("outcome", "MODEL_ERROR")))] == 1
    assert got[("ddml_malformed_messages_total", ())] == 1
    assert got[("ddml_batch_size_count", (("model", "m"),))] == 1
    assert got[("ddml_batch_size_sum", (("model", "m"),))] == 3
    assert got[("ddml_batch_size_bucket", (("le", "4.0"), ("model", "m")))] == 1
    assert got[("ddml_batch_size_bucket", (("le", "2.0"), ("model", "m")))] == 0
    assert got[("ddml_queue_wait_seconds_count", (("model", "m"),))] == 3
    assert got[("ddml_batch_latency_seconds_sum", (("model", "m"),))] == 0.25
    assert got[("ddml_workers", (("model", "m"), ("state", "idle")))] == 1
    assert got[("ddml_queue_depth", (("model", "m"),))] == 0
    assert ("ddml_redispatched_inputs_total", (("model", "m"),)) not in got  # none yet: no series

    core.on_frames(Peer.GATEWAY, b"gw", [b"more garbage"], 1.0)
    assert samples(metrics)[("ddml_malformed_messages_total", ())] == 1  # the snapshot, not the live count
    metrics.publish(core.describe(1.0))
    assert samples(metrics)[("ddml_malformed_messages_total", ())] == 2


def test_a_fresh_broker_exports_its_malformed_count_and_nothing_per_model():
    got = samples(BrokerMetrics())
    assert set(got) == {("ddml_malformed_messages_total", ()), ("ddml_malformed_messages_created", ())}
    assert got[("ddml_malformed_messages_total", ())] == 0
