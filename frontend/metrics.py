"""The frontend's Prometheus metrics. Labels are bounded sets (method, gRPC code, operation, worker state,
key_id, of which the token holds few, mechanism, CKR name): never error strings, uids or other free text."""

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from keysealer.shared.broker_stats import LATENCY_BUCKETS, BrokerStats
from keysealer.shared.ipc_schema import WorkerState

# The `le` labels of the broker's latency buckets, spelled as prometheus-client spells its own histograms'.
_BUCKET_LABELS = [floatToGoString(b) for b in (*LATENCY_BUCKETS, float("inf"))]  # type: ignore[no-untyped-call]


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("keysealer_requests", "KMS calls answered, by method and gRPC code",
                                ["method", "code"], registry=self.registry)
        self.request_seconds = Histogram("keysealer_request_seconds", "KMS call latency, by method",
                                         ["method"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.broker_seconds = Histogram("keysealer_broker_roundtrip_seconds",
                                        "Frontend to broker and back (token operation included), by operation",
                                        ["operation"], buckets=LATENCY_BUCKETS, registry=self.registry)
        self.in_flight = Gauge("keysealer_calls_in_flight", "Encrypt/Decrypt calls being served",
                               registry=self.registry)
        self.refused = Counter("keysealer_calls_refused_overload",
                               "Calls refused at once because limits.max_in_flight was reached",
                               registry=self.registry)
        self.current_key = Gauge("keysealer_current_key", "1 for the key new seeds are wrapped with",
                                 ["key_id"], registry=self.registry)
        self.last_healthy_probe = Gauge("keysealer_last_successful_probe_timestamp_seconds",
                                        "When a real wrap and unwrap through broker and token last succeeded",
                                        registry=self.registry)
        self.workers = Gauge("keysealer_broker_workers", "Broker workers, by state", ["state"],
                             registry=self.registry)
        self.broker = BrokerStatsCollector()
        self.registry.register(self.broker)

    def set_current_key(self, key_id: str) -> None:
        self.current_key.clear()
        if key_id:
            self.current_key.labels(key_id).set(1)

    def set_workers(self, states: list[str]) -> None:
        self.workers.clear()
        for state in WorkerState:
            self.workers.labels(state.value).set(states.count(state))


class BrokerStatsCollector(Collector):
    """What the broker measured, as its last health report gave it.

    The broker counts; the frontend only shows the totals it was sent (prometheus-client's way for values
    counted elsewhere), so they are as monotonic as the broker's own, which restart from zero only when the
    broker does. Read from the scrape thread: `last` is replaced whole, never changed in place.
    """

    def __init__(self) -> None:
        self.last = BrokerStats()

    def collect(self) -> Iterator[Metric]:
        stats = self.last
        latency = HistogramMetricFamily("keysealer_broker_token_operation_seconds",
                                        "Token operations timed in the broker's workers, by operation and the "
                                        "key's mechanism (none: login, find_keys)",
                                        labels=["operation", "mechanism"])
        for operation, mechanism in sorted(stats.token.latency):
            histogram = stats.token.latency[operation, mechanism]
            cumulative, buckets = 0, []
            for label, count in zip(_BUCKET_LABELS, histogram.counts, strict=True):
                cumulative += count
                buckets.append((label, float(cumulative)))
            latency.add_metric([operation.value, mechanism], buckets, histogram.sum_us / 1e6)
        yield latency
        errors = CounterMetricFamily("keysealer_broker_token_errors",
                                     "PKCS #11 errors that cost the broker a session or a login (and failed "
                                     "token opens), by CKR name (other: a code without a standard name)",
                                     labels=["ckr"])
        for name, count in sorted(stats.token.errors.items()):
            errors.add_metric([name], count)
        yield errors
        yield CounterMetricFamily("keysealer_broker_token_relogins",
                                  "Logins after a worker's first: it lost the token and opened it again",
                                  value=stats.token.relogins)
        yield CounterMetricFamily("keysealer_broker_module_reinitializations",
                                  "PKCS #11 module finalized after a token error, to be initialized afresh",
                                  value=stats.token.reinitializations)
        yield CounterMetricFamily("keysealer_broker_session_replacements",
                                  "Fresh token sessions opened after a session error (the call was retried)",
                                  value=stats.token.session_replacements)
        yield CounterMetricFamily("keysealer_broker_worker_busy_seconds",
                                  "Time broker workers spent serving requests, summed over workers",
                                  value=stats.busy_us / 1e6)
        activity = GaugeMetricFamily("keysealer_broker_ready_workers",
                                     "Ready broker workers (one token session each), by whether they are serving "
                                     "a request (busy) or waiting for one (idle)", labels=["activity"])
        activity.add_metric(["busy"], stats.busy_workers)
        activity.add_metric(["idle"], stats.idle_workers)
        yield activity
