"""Prometheus metrics of one service (`GET /metrics`), in its own registry.

Counters and gauges are read from the engine's and the prefix cache's own counts when scraped;
the two latency histograms are observed as each request ends. Rates come from the counters:
tokens/s = rate(prefixfleet_generated_tokens_total), rows per step =
rate(prefixfleet_decode_rows_total) / rate(prefixfleet_decode_steps_total).
"""
from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from prefixfleet.pipelines.serving.cache import PrefixCache
from prefixfleet.pipelines.serving.engine import Engine, Finished

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class _Counts(Collector):
    def __init__(self, engine: Engine, cache: PrefixCache) -> None:
        self.engine, self.cache = engine, cache

    def collect(self) -> Iterator[Metric]:
        stats, engine = self.engine.stats, self.engine
        yield GaugeMetricFamily("prefixfleet_queue_depth", "Requests waiting to be admitted.", value=engine.queued)
        yield GaugeMetricFamily("prefixfleet_running_rows", "Rows in the decode batch.", value=engine.running)
        for name, help_text, value in (
            ("decode_steps", "Decode steps run.", stats.steps),
            ("decode_rows", "Rows summed over decode steps.", stats.row_steps),
            ("prefills", "Prefill forward passes run.", stats.prefills),
            ("generated_tokens", "New tokens generated, every row's.", stats.tokens),
            ("finished_requests", "Rows that ran to their end.", stats.finished),
        ):
            yield CounterMetricFamily(f"prefixfleet_{name}", help_text, value=value)
        usage = self.cache.usage()
        hits = CounterMetricFamily("prefixfleet_prefix_cache_hits", "Prefix lookups a tier answered.", labels=["tier"])
        misses = CounterMetricFamily("prefixfleet_prefix_cache_misses", "Prefix lookups a tier could not answer.",
                                     labels=["tier"])
        held = GaugeMetricFamily("prefixfleet_prefix_cache_bytes", "Bytes a tier holds.", labels=["tier"])
        hits.add_metric(["device"], usage["device_hits"])
        misses.add_metric(["device"], usage["host_hits"] + usage["registry_fetches"])
        hits.add_metric(["host"], usage["host_hits"])
        misses.add_metric(["host"], usage["registry_fetches"])
        held.add_metric(["device"], usage["device_bytes"])
        held.add_metric(["host"], usage["host_bytes"])
        yield from (hits, misses, held)


class ServiceMetrics:
    def __init__(self, engine: Engine, cache: PrefixCache) -> None:
        self.registry = CollectorRegistry()
        self.registry.register(_Counts(engine, cache))
        self.first_token = Histogram("prefixfleet_time_to_first_token_seconds", "From arrival to the first new token.",
                                     buckets=_SECONDS, registry=self.registry)
        self.latency = Histogram("prefixfleet_request_latency_seconds", "From arrival to the last new token.",
                                 buckets=_SECONDS, registry=self.registry)

    def observe(self, done: Finished) -> None:
        self.first_token.observe(done.first_token_s)
        self.latency.observe(done.latency_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)
