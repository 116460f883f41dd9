"""Prometheus metrics of the local API, in a registry of their own.

Each :class:`ApiMetrics` owns a :class:`prometheus_client.CollectorRegistry`, so several apps in one process
(tests) never collide on the global default registry. ``/metrics`` renders exactly this registry.

Labels are bounded: ``route`` is the route's *name* (a fixed set; unmatched paths are ``unmatched``), never the
raw path, and ``model`` is a model name that passed validation and exists in the registry.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import psutil
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from agent.inference import LoadStats, QueueKind

__all__ = ["CONTENT_TYPE_LATEST", "ApiMetrics"]

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
_QUEUE_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)


class _SchedulerCollector(Collector):
    """Each resident model's admission queues and slots, read at scrape time (see ``LoadedModel.queue_stats``).

    Every family has a ``queue`` label: ``generation`` (chat and completions), ``embeddings`` or ``tensor``
    (ONNX runs). A queue's waiting cost is ``_waiting_tokens`` (generation, embeddings) or ``_waiting_bytes``
    (tensor).
    """

    def __init__(self, read: Callable[[], Mapping[str, Mapping[QueueKind, LoadStats]]]) -> None:
        self._read = read

    def collect(self) -> Iterator[Metric]:
        stats = self._read()
        labels = ["model", "queue"]
        waiting = GaugeMetricFamily(
            "edge_agent_scheduler_waiting",
            "Requests waiting for their model, by model name, queue and priority class.",
            labels=[*labels, "priority"],
        )
        tokens = GaugeMetricFamily(
            "edge_agent_scheduler_waiting_tokens", "Prompt tokens or tokens to embed waiting.", labels=labels
        )
        nbytes = GaugeMetricFamily(
            "edge_agent_scheduler_waiting_bytes", "Input bytes of tensor runs waiting.", labels=labels
        )
        busy = GaugeMetricFamily(
            "edge_agent_scheduler_slots_busy", "Slots running a request (requests in flight).", labels=labels
        )
        slots = GaugeMetricFamily("edge_agent_scheduler_slots", "Requests run at once.", labels=labels)
        admitted = CounterMetricFamily(
            "edge_agent_scheduler_admitted", "Requests that got a slot since the model was loaded.", labels=labels
        )
        rejected = CounterMetricFamily(
            "edge_agent_scheduler_rejected", "Requests refused with 429 because the queue was full.", labels=labels
        )
        queued = CounterMetricFamily(
            "edge_agent_scheduler_queue_seconds", "Seconds admitted requests spent waiting, summed.", labels=labels
        )
        for model, queues in sorted(stats.items()):
            for kind, snapshot in sorted(queues.items()):
                key = [model, kind]
                waiting.add_metric([*key, "interactive"], snapshot.waiting_interactive)
                waiting.add_metric([*key, "batch"], snapshot.waiting_batch)
                (nbytes if kind == "tensor" else tokens).add_metric(key, snapshot.waiting_tokens)
                busy.add_metric(key, snapshot.slots_busy)
                slots.add_metric(key, snapshot.slots_total)
                admitted.add_metric(key, snapshot.admitted_total)
                rejected.add_metric(key, snapshot.rejected_total)
                queued.add_metric(key, snapshot.queue_seconds_total)
        yield from (waiting, tokens, nbytes, busy, slots, admitted, rejected, queued)


class ApiMetrics:
    """The API's metrics. ``queue_depth`` and ``loaded_models`` read live values at scrape time."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        self.requests = Counter(
            "edge_agent_api_requests",
            "HTTP requests answered, by route name, method and status.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.request_latency = Histogram(
            "edge_agent_api_request_duration_seconds",
            "Time from request start to the end of the response, by route name.",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "edge_agent_api_requests_in_flight", "Requests being handled now.", registry=self.registry
        )
        self.tokens_generated = Counter(
            "edge_agent_tokens_generated",
            "Completion tokens generated, by model name.",
            ["model"],
            registry=self.registry,
        )
        self.prompt_tokens = Counter(
            "edge_agent_prompt_tokens",
            "Prompt tokens processed, by model name.",
            ["model"],
            registry=self.registry,
        )
        self.time_to_first_token = Histogram(
            "edge_agent_time_to_first_token_seconds",
            "Time from request start to the first generated text, by model name.",
            ["model"],
            buckets=_TTFT_BUCKETS,
            registry=self.registry,
        )
        self.queue_wait = Histogram(
            "edge_agent_queue_wait_seconds",
            "Time a generation request waited for a slot of its model, by model name.",
            ["model"],
            buckets=_QUEUE_BUCKETS,
            registry=self.registry,
        )
        self.inference_in_flight = Gauge(
            "edge_agent_inference_requests_in_flight",
            "Inference requests admitted by the API and not finished (queued or running), by model name.",
            ["model"],
            registry=self.registry,
        )
        self._queue_depth = Gauge(
            "edge_agent_queue_depth",
            "Inference requests waiting or running across all models.",
            registry=self.registry,
        )
        self._loaded_models = Gauge("edge_agent_loaded_models", "Models loaded in memory now.", registry=self.registry)
        self._memory = Gauge(
            "edge_agent_process_memory_rss_bytes",
            "Resident set size of the agent process (psutil; portable).",
            registry=self.registry,
        )
        process = psutil.Process()
        self._memory.set_function(lambda: float(process.memory_info().rss))
        self._queue_depth.set_function(self._sum_in_flight)
        self._loaded_models.set_function(lambda: 0.0)

    def _sum_in_flight(self) -> float:
        total = 0.0
        for metric in self.inference_in_flight.collect():
            total += sum(sample.value for sample in metric.samples)
        return total

    def in_flight_now(self) -> float:
        """Requests being handled now."""
        return sum(sample.value for metric in self.in_flight.collect() for sample in metric.samples)

    def watch_queue_depth(self, read: Callable[[], float]) -> None:
        """Read the queue depth from ``read`` at scrape time (instead of the API's own in-flight count)."""
        self._queue_depth.set_function(read)

    def watch_schedulers(self, read: Callable[[], Mapping[str, Mapping[QueueKind, LoadStats]]]) -> None:
        """Export each model's queues (depth, waiting cost, slot use) from ``read`` at scrape time."""
        self.registry.register(_SchedulerCollector(read))

    def watch_loaded_models(self, read: Callable[[], float]) -> None:
        """Read the number of loaded models from ``read`` at scrape time."""
        self._loaded_models.set_function(read)

    def render(self) -> bytes:
        """The registry in Prometheus' text exposition format."""
        return generate_latest(self.registry)
