"""The frontend's Prometheus metrics. Labels are bounded sets (method, gRPC code, operation, worker state,
key_id, of which the token holds few): never error strings, uids or other free text."""

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# From a fraction of a millisecond (SoftHSM) to the apiserver's 3 s deadline.
LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


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

    def set_current_key(self, key_id: str) -> None:
        self.current_key.clear()
        if key_id:
            self.current_key.labels(key_id).set(1)

    def set_workers(self, states: list[str]) -> None:
        self.workers.clear()
        for state in ("starting", "ready", "failed", "fatal"):
            self.workers.labels(state).set(states.count(state))
