"""Prometheus metrics, with prometheus-client: what each process counts, and what is read from the
database and the broker when Prometheus scrapes (jobs by status, queue depth).

The API serves them at GET /metrics (no tenant key: operators' tooling scrapes it), or on a port
of their own (`METRICS_PORT`), or not at all (`METRICS_ENABLED=false`). A training worker serves
its own on `WORKER_METRICS_PORT`: its pool processes write them to a directory that the worker's
main process reads (prometheus-client's multiprocess mode), since a pool process lives for one job.
"""

import time
from collections.abc import Callable, Iterable

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

HTTP_REQUESTS = Counter("visiontune_http_requests_total", "HTTP requests answered", ["method", "route", "status"])
HTTP_SECONDS = Histogram("visiontune_http_request_duration_seconds", "Time to answer an HTTP request", ["method", "route"])
PREDICTED_IMAGES = Counter("visiontune_predicted_images_total", "Images classified", ["runtime"])
DEVICE_DECODED_IMAGES = Counter(
    "visiontune_device_decoded_images_total", "Images classified whose JPEG was decoded where the model runs"
)
BATCH_SIZE = Histogram("visiontune_micro_batch_images", "Images per forward pass of the micro-batcher",
                       buckets=(1, 2, 4, 8, 16, 32, 64, 128))  # fmt: skip
CACHE_LOADS = Counter("visiontune_model_cache_loads_total", "Models loaded into this process's cache")
CACHE_EVICTIONS = Counter("visiontune_model_cache_evictions_total", "Models dropped from this process's cache")
CACHE_BYTES = Gauge("visiontune_model_cache_bytes", "Bytes of weights in this process's model cache")

# Written by training workers' pool processes (multiprocess mode: `livesum`/counters add up).
EPOCH_SECONDS = Histogram("visiontune_epoch_seconds", "Wall time of a training epoch",
                          buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600))  # fmt: skip
TRAIN_IMAGES_PER_SECOND = Gauge("visiontune_train_images_per_second", "Training throughput of the last epoch",
                                multiprocess_mode="mostrecent")  # fmt: skip
JOBS_FINISHED = Counter("visiontune_worker_jobs_total", "Jobs this worker ran, by outcome", ["outcome"])


class HttpMetrics:
    """ASGI middleware: every answer counted by route template (not raw path: ids would make a
    series per object) and timed."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), [500]

        async def send_and_note(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_note)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            HTTP_REQUESTS.labels(scope["method"], route, str(status[0])).inc()
            HTTP_SECONDS.labels(scope["method"], route).observe(time.perf_counter() - started)


class StateCollector(Collector):
    """Read at scrape time: jobs by status (from the database) and messages waiting per queue
    (from the broker). A source that cannot be reached is left out of that scrape."""

    def __init__(self, jobs_by_status: Callable[[], dict[str, int]], queue_depths: Callable[[], dict[str, int]]):
        self.jobs_by_status, self.queue_depths = jobs_by_status, queue_depths

    def collect(self) -> Iterable[GaugeMetricFamily]:
        jobs = GaugeMetricFamily("visiontune_jobs", "Jobs by status", labels=["status"])
        queues = GaugeMetricFamily("visiontune_queue_messages", "Messages waiting in each broker queue", labels=["queue"])
        for family, read in ((jobs, self.jobs_by_status), (queues, self.queue_depths)):
            try:
                for label, value in read().items():
                    family.add_metric([label], value)
            except Exception:  # the database or broker is down: /readyz says so, the scrape goes on
                continue
            yield family
