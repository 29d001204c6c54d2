"""Prometheus metrics for one engine, through prometheus_client: one CollectorRegistry per engine (no process-wide
state, so several engines in one process each report their own), counters and histograms with labels, gauges
read from callables when scraped; `render` is the text exposition format /metrics serves. `labels` (the role and
worker id of a process on a shared queue: reverie.server.shared) are added to every series it renders.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics_core import Metric

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    """Counters (`inc`), histograms (`observe`) and gauges (`gauge`, a callable read at scrape time), declared by
    name (without the prefix) with the label names their series take."""

    def __init__(self, prefix: str = "reverie", labels: dict | None = None):
        self.prefix, self.labels = prefix, dict(labels or {})
        self.registry = CollectorRegistry(auto_describe=True)
        self._metrics: dict[str, Counter | Histogram | Gauge] = {}

    def counter(self, name: str, help: str, labels: tuple[str, ...] = ()) -> None:
        self._metrics[name] = Counter(f"{self.prefix}_{name}", help, labels, registry=self.registry)

    def histogram(self, name: str, help: str, buckets=LATENCY_BUCKETS, labels: tuple[str, ...] = ()) -> None:
        self._metrics[name] = Histogram(f"{self.prefix}_{name}", help, labels, buckets=tuple(buckets),
                                        registry=self.registry)

    def gauge(self, name: str, help: str, read) -> None:
        gauge = Gauge(f"{self.prefix}_{name}", help, registry=self.registry)
        gauge.set_function(read)
        self._metrics[name] = gauge

    def _series(self, name: str, labels: dict):
        metric = self._metrics[name]
        return metric.labels(**labels) if labels else metric

    def inc(self, name: str, amount: float = 1, **labels) -> None:
        self._series(name, labels).inc(amount)

    def observe(self, name: str, value: float, **labels) -> None:
        self._series(name, labels).observe(value)

    def value(self, name: str, **labels) -> float:
        """A counter's current value (0 if never incremented); a histogram's observation count."""
        metric = self._metrics[name]
        suffix = "_count" if isinstance(metric, Histogram) else "_total"
        value = self.registry.get_sample_value(f"{self.prefix}_{name.removesuffix('_total')}{suffix}", labels)
        return 0 if value is None else value

    def render(self) -> str:
        return generate_latest(_Labelled(self.registry, self.labels) if self.labels else self.registry).decode()


class _Labelled:
    """A registry's metrics with constant labels added to every sample."""

    def __init__(self, registry: CollectorRegistry, labels: dict):
        self.registry, self.labels = registry, labels

    def collect(self):
        for metric in self.registry.collect():
            out = Metric(metric.name, metric.documentation, metric.type, metric.unit)
            out.samples = [s._replace(labels={**self.labels, **s.labels}) for s in metric.samples]
            yield out
