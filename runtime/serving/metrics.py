"""Prometheus metrics of the server, with NVIDIA Triton Inference Server's names where they apply, so dashboards
and alerts written for Triton work unchanged.

Triton's (labels ``model``, ``version``; durations are cumulative microseconds). Triton exposes its counters
under these exact names, without the ``_total`` suffix that prometheus_client's text format adds to the series of
a ``counter`` family; to keep the names queries and dashboards use, the cumulative ones are declared untyped
(``# TYPE ... untyped``), which Prometheus ingests and ``rate()`` reads the same way:

* ``nv_inference_request_success`` / ``nv_inference_request_failure{reason}`` -- requests; reason REJECTED (queue
  full, timed out, shutting down), CANCELED (client went away), BACKEND (the forward pass failed), OTHER (a bad
  request);
* ``nv_inference_count`` (sequences inferred) and ``nv_inference_exec_count`` (forward passes);
* ``nv_inference_pending_request_count`` (gauge: requests queued and not yet dispatched);
* ``nv_inference_request_duration_us``, ``nv_inference_queue_duration_us``, ``nv_inference_compute_infer_duration_us``
  (successful requests).

Ours (histograms): ``reformer_rt_request_tokens`` (real tokens per request), ``reformer_rt_batch_size`` (sequences
per forward pass), ``reformer_rt_batch_tokens`` (padded tokens per forward pass), ``reformer_rt_padding_waste``
(share of a forward pass that is padding), ``reformer_rt_request_latency_seconds``; counter
``reformer_rt_tokens_total`` (real tokens inferred).

Exposition is prometheus_client's (text format 0.0.4) from one registry per server.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from .model import ServedModel

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
FAILURE_REASONS = ("REJECTED", "CANCELED", "BACKEND", "OTHER")

#: Triton's metric families: name -> (type, help); "unknown" is exposed as untyped (see the module docstring).
_TRITON = {
    "nv_inference_request_success": ("unknown", "Number of successful inference requests, all batch sizes"),
    "nv_inference_request_failure": ("unknown", "Number of failed inference requests, all batch sizes"),
    "nv_inference_count": ("unknown", "Number of inferences performed (sequences; a request may carry several)"),
    "nv_inference_exec_count": ("unknown", "Number of model executions performed (forward passes)"),
    "nv_inference_pending_request_count": ("gauge", "Instantaneous number of pending requests awaiting execution"),
    "nv_inference_request_duration_us": ("unknown", "Cumulative inference request duration in microseconds"),
    "nv_inference_queue_duration_us": ("unknown", "Cumulative inference queuing duration in microseconds"),
    "nv_inference_compute_infer_duration_us": ("unknown", "Cumulative compute inference duration in microseconds"),
}


class _TritonFamilies(Collector):
    """Values keyed by (family, labels), exposed as Triton names them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._values: dict[str, dict[tuple[tuple[str, str], ...], float]] = defaultdict(dict)

    def add(self, family: str, labels: dict[str, str], amount: float) -> None:
        key = tuple(sorted(labels.items()))
        with self._lock:
            self._values[family][key] = self._values[family].get(key, 0.0) + amount

    def set(self, family: str, labels: dict[str, str], value: float) -> None:
        with self._lock:
            self._values[family][tuple(sorted(labels.items()))] = value

    def value(self, family: str, labels: dict[str, str]) -> float:
        with self._lock:
            return self._values[family].get(tuple(sorted(labels.items())), 0.0)

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            snapshot = {family: dict(values) for family, values in self._values.items()}
        for family, (kind, doc) in _TRITON.items():
            metric = Metric(family, doc, kind)
            for labels, value in sorted(snapshot.get(family, {}).items()):
                metric.add_sample(family, dict(labels), value)
            yield metric


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._triton = _TritonFamilies()
        self.registry.register(self._triton)
        labels = ["model", "version"]
        powers = [2.0 ** k for k in range(4, 20)] + [float("inf")]
        self.request_tokens = Histogram("reformer_rt_request_tokens", "Real tokens per request", labels,
                                        buckets=powers, registry=self.registry)
        self.batch_size = Histogram("reformer_rt_batch_size", "Sequences per forward pass", labels,
                                    buckets=[1, 2, 4, 8, 16, 32, 64, 128, 256, float("inf")], registry=self.registry)
        self.batch_tokens = Histogram("reformer_rt_batch_tokens", "Padded tokens per forward pass", labels,
                                      buckets=powers, registry=self.registry)
        self.padding_waste = Histogram("reformer_rt_padding_waste", "Share of a forward pass that is padding", labels,
                                       buckets=[0.0, 0.01, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0],
                                       registry=self.registry)
        self.latency = Histogram("reformer_rt_request_latency_seconds", "Request latency, arrival to response",
                                 labels, buckets=[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60,
                                                  float("inf")], registry=self.registry)
        self.tokens = Counter("reformer_rt_tokens", "Real tokens inferred", labels, registry=self.registry)
        self._last_inference_ms: dict[str, float] = {}

    @staticmethod
    def _labels(model: ServedModel) -> dict[str, str]:
        return {"model": model.name, "version": model.version}

    def register(self, model: ServedModel) -> None:
        """Show a model's series (at zero) from the start, as Triton does."""
        labels = self._labels(model)
        for family in ("nv_inference_request_success", "nv_inference_count", "nv_inference_exec_count",
                       "nv_inference_request_duration_us", "nv_inference_queue_duration_us",
                       "nv_inference_compute_infer_duration_us"):
            self._triton.add(family, labels, 0.0)
        for reason in FAILURE_REASONS:
            self._triton.add("nv_inference_request_failure", {**labels, "reason": reason}, 0.0)
        self._triton.set("nv_inference_pending_request_count", labels, 0.0)

    def set_pending(self, model: ServedModel, pending: int) -> None:
        self._triton.set("nv_inference_pending_request_count", self._labels(model), float(pending))

    def record_batch(self, model: ServedModel, sequences: int, length: int, real_tokens: int) -> None:
        labels = self._labels(model)
        padded = sequences * length
        self._triton.add("nv_inference_count", labels, sequences)
        self._triton.add("nv_inference_exec_count", labels, 1)
        self.batch_size.labels(*labels.values()).observe(sequences)
        self.batch_tokens.labels(*labels.values()).observe(padded)
        self.padding_waste.labels(*labels.values()).observe(1.0 - real_tokens / padded)
        self.tokens.labels(*labels.values()).inc(real_tokens)

    def record_generation(self, model: ServedModel, sequences: int, passes: int) -> None:
        """A generation's share of the counts: its prompts as inferences, its forward passes (prefill and cached
        steps) as executions."""
        labels = self._labels(model)
        self._triton.add("nv_inference_count", labels, sequences)
        self._triton.add("nv_inference_exec_count", labels, passes)

    def record_success(self, model: ServedModel, tokens: int, seconds: float, queue_us: float,
                       compute_us: float) -> None:
        labels = self._labels(model)
        self._triton.add("nv_inference_request_success", labels, 1)
        self._triton.add("nv_inference_request_duration_us", labels, seconds * 1e6)
        self._triton.add("nv_inference_queue_duration_us", labels, queue_us)
        self._triton.add("nv_inference_compute_infer_duration_us", labels, compute_us)
        self.request_tokens.labels(*labels.values()).observe(tokens)
        self.latency.labels(*labels.values()).observe(seconds)
        self._last_inference_ms[model.name] = time.time() * 1000

    def record_failure(self, model: ServedModel, reason: str) -> None:
        assert reason in FAILURE_REASONS, reason
        self._triton.add("nv_inference_request_failure", {**self._labels(model), "reason": reason}, 1)

    def statistics(self, model: ServedModel) -> dict[str, Any]:
        """The model's counters in the shape of Triton's statistics extension (``GET /v2/models/NAME/stats``):
        counts, and cumulative durations in nanoseconds."""
        labels = self._labels(model)
        value = self._triton.value
        success = int(value("nv_inference_request_success", labels))
        failed = sum(value("nv_inference_request_failure", {**labels, "reason": r}) for r in FAILURE_REASONS)

        def duration(family: str, count: int) -> dict[str, int]:
            return {"count": count, "ns": int(value(family, labels) * 1000)}

        return {
            "name": model.name, "version": model.version,
            "last_inference": int(self._last_inference_ms.get(model.name, 0.0)),
            "inference_count": int(value("nv_inference_count", labels)),
            "execution_count": int(value("nv_inference_exec_count", labels)),
            "inference_stats": {
                "success": duration("nv_inference_request_duration_us", success),
                "fail": {"count": int(failed), "ns": 0},
                "queue": duration("nv_inference_queue_duration_us", success),
                "compute_input": {"count": success, "ns": 0},
                "compute_infer": duration("nv_inference_compute_infer_duration_us", success),
                "compute_output": {"count": success, "ns": 0},
            },
            "batch_stats": [],
        }

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
