"""The broker's hot-path metrics: plain counters and histograms, exposed in Prometheus format."""

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from broker.metrics import BrokerMetrics


def samples(metrics: BrokerMetrics) -> dict:
    text = generate_latest(metrics.registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_histogram_buckets_are_cumulative_and_inclusive_of_their_bound():
    metrics = BrokerMetrics()
    sizes = metrics.batch_size.labels("m")
    for value in (1, 2, 3, 64, 1000):
        sizes.observe(value)
    got = samples(metrics)

    def bucket(le: str) -> float:
        return got[("ddml_batch_size_bucket", (("le", le), ("model", "m")))]

    assert [bucket("1.0"), bucket("2.0"), bucket("4.0"), bucket("64.0"), bucket("512.0"), bucket("+Inf")] == \
        [1, 2, 3, 4, 4, 5]
    assert got[("ddml_batch_size_count", (("model", "m"),))] == 5
    assert got[("ddml_batch_size_sum", (("model", "m"),))] == 1070


def test_request_counts_by_model_and_outcome():
    metrics = BrokerMetrics()
    for outcome in ("ok", "ok", "TIMEOUT"):
        metrics.requests.inc("m", outcome)
    metrics.requests.inc("other", "ok")
    got = samples(metrics)
    assert got[("ddml_requests_total", (("model", "m"), ("outcome", "ok")))] == 2
    assert got[("ddml_requests_total", (("model", "m"), ("outcome", "TIMEOUT")))] == 1
    assert got[("ddml_requests_total", (("model", "other"), ("outcome", "ok")))] == 1
