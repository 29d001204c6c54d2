"""Prometheus metrics for one engine, in the text exposition format (version 0.0.4).

One Metrics object per engine (no process-wide registry): counters and histograms with optional labels,
gauges read from callables when scraped.
"""

from __future__ import annotations

import bisect
import threading

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class Metrics:
    """Counters (`inc`), histograms (`observe`) and gauges (`gauge`, a callable read at scrape time)."""

    def __init__(self, prefix: str = "reverie"):
        self.prefix = prefix
        self._lock = threading.Lock()
        self._help: dict[str, tuple[str, str]] = {}  # name -> (type, help)
        self._counters: dict[tuple, float] = {}  # (name, labels) -> value
        self._histograms: dict[tuple, list] = {}  # (name, labels) -> [bucket counts..., sum, count]
        self._buckets: dict[str, tuple] = {}
        self._gauges: dict[str, callable] = {}

    def counter(self, name: str, help: str) -> None:
        self._help[name] = ("counter", help)

    def histogram(self, name: str, help: str, buckets=LATENCY_BUCKETS) -> None:
        self._help[name] = ("histogram", help)
        self._buckets[name] = tuple(buckets)

    def gauge(self, name: str, help: str, read) -> None:
        self._help[name] = ("gauge", help)
        self._gauges[name] = read

    def inc(self, name: str, amount: float = 1, **labels) -> None:
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            self._counters[key] = self._counters.get(key, 0) + amount

    def observe(self, name: str, value: float, **labels) -> None:
        buckets = self._buckets[name]
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            counts = self._histograms.setdefault(key, [0] * len(buckets) + [0.0, 0])
            i = bisect.bisect_left(buckets, value)  # the first bucket with le >= value
            if i < len(buckets):
                counts[i] += 1
            counts[-2] += value
            counts[-1] += 1

    def value(self, name: str, **labels) -> float:
        """A counter's current value (0 if never incremented); a histogram's observation count."""
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            if name in self._buckets:
                return self._histograms.get(key, [0])[-1]
            return self._counters.get(key, 0)

    def render(self) -> str:
        lines = []
        with self._lock:
            counters, histograms = dict(self._counters), {k: list(v) for k, v in self._histograms.items()}
        for name, (kind, help) in self._help.items():
            full = f"{self.prefix}_{name}"
            lines += [f"# HELP {full} {help}", f"# TYPE {full} {kind}"]
            if kind == "gauge":
                lines.append(f"{full} {_number(self._gauges[name]())}")
            elif kind == "counter":
                series = [(labels, v) for (n, labels), v in counters.items() if n == name]
                for labels, v in series or [((), 0)]:
                    lines.append(f"{full}{_labels(labels)} {_number(v)}")
            else:
                buckets = self._buckets[name]
                for (n, labels), counts in histograms.items():
                    if n != name:
                        continue
                    total = 0
                    for le, c in zip(buckets, counts):
                        total += c
                        lines.append(f"{full}_bucket{_labels(labels + (('le', _number(le)),))} {total}")
                    lines.append(f"{full}_bucket{_labels(labels + (('le', '+Inf'),))} {counts[-1]}")
                    lines.append(f"{full}_sum{_labels(labels)} {_number(counts[-2])}")
                    lines.append(f"{full}_count{_labels(labels)} {counts[-1]}")
        return "\n".join(lines) + "\n"


def _labels(labels) -> str:
    if not labels:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in labels) + "}"


def _escape(value) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(v) -> str:
    return str(int(v)) if float(v).is_integer() else repr(float(v))
