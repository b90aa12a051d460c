"""Prometheus metrics of a KV store (`llm-mesh kvstore --metrics-port`, /metrics).

From the core's Stats (a snapshot the service refreshes on the core thread every tick, so a
scrape never touches the core):
- llm_mesh_kvstore_blocks{tier}, llm_mesh_kvstore_bytes{tier}, llm_mesh_kvstore_capacity_bytes{tier}
  tier: ram | disk
- llm_mesh_kvstore_pinned_blocks, llm_mesh_kvstore_reserved_blocks
- llm_mesh_kvstore_hit_blocks_total, llm_mesh_kvstore_miss_blocks_total, llm_mesh_kvstore_stored_blocks_total,
  llm_mesh_kvstore_spilled_blocks_total, llm_mesh_kvstore_evicted_blocks_total,
  llm_mesh_kvstore_corrupt_blocks_total (blocks whose bytes failed their checksum: dropped, never served),
  llm_mesh_kvstore_disk_errors_total (failed disk-tier reads/writes)
Counted by the service:
- llm_mesh_kvstore_transfer_bytes_total{path, op}   path: nixl (committed reservations, pinned
  slots: the bytes peers moved over NIXL) | grpc (PutBlocks / GetBlocks); op: write | read
- llm_mesh_kvstore_requests_total{method, code}     every RPC by its gRPC status
- llm_mesh_kvstore_chunk_records                    chunk records the store keeps in etcd
- llm_mesh_kvstore_chunk_writes_total               etcd puts/deletes of chunk records
- llm_mesh_etcd_lease_* (kind="kvstore"), process_*, python_*
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from kvstore.types import Stats
from services import metrics
from services.membership import Registration

# (metric, Stats field, help): names spelled out, so a search of the source finds each.
_COUNTERS = [("llm_mesh_kvstore_hit_blocks", "hit_blocks", "Blocks found by Lookup / Pin / GetBlocks"),
             ("llm_mesh_kvstore_miss_blocks", "miss_blocks", "Blocks asked for and not held"),
             ("llm_mesh_kvstore_stored_blocks", "stored_blocks", "Blocks committed (CommitWrite and PutBlocks)"),
             ("llm_mesh_kvstore_spilled_blocks", "spilled_blocks", "Blocks moved from RAM to disk"),
             ("llm_mesh_kvstore_evicted_blocks", "evicted_blocks", "Blocks dropped from the store"),
             ("llm_mesh_kvstore_corrupt_blocks", "corrupt_blocks",
              "Blocks whose bytes failed their checksum (dropped, never served)"),
             ("llm_mesh_kvstore_disk_errors", "disk_errors", "Failed reads/writes of the disk tier")]


class KVStoreMetrics:
    def __init__(self, stats: Callable[[], Stats | None], registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        r.register(_StatsCollector(stats))
        self.transfer_bytes = Counter("llm_mesh_kvstore_transfer_bytes", "Block bytes moved, by path and op",
                                      ["path", "op"], registry=r)
        self.requests = Counter("llm_mesh_kvstore_requests", "KVStore RPCs by gRPC status", ["method", "code"],
                                registry=r)
        self.chunk_records = Gauge("llm_mesh_kvstore_chunk_records", "Chunk records kept in etcd", registry=r)
        self.chunk_writes = Counter("llm_mesh_kvstore_chunk_writes", "etcd puts and deletes of chunk records",
                                    registry=r)
        for path in ("nixl", "grpc"):
            for op in ("write", "read"):
                self.transfer_bytes.labels(path, op)

    def moved(self, path: str, op: str, nbytes: int) -> None:
        if nbytes:
            self.transfer_bytes.labels(path, op).inc(nbytes)

    def request(self, method: str, code: str) -> None:
        self.requests.labels(method, code).inc()

    def watch_lease(self, registration: Registration) -> None:
        metrics.watch_lease(self.registry, registration)

    def serve(self, port: int, host: str = "127.0.0.1") -> None:
        metrics.serve(self.registry, port, host)


class _StatsCollector(Collector):
    def __init__(self, stats: Callable[[], Stats | None]) -> None:
        self._stats = stats

    def collect(self):  # noqa: ANN201 - prometheus_client's protocol
        s = self._stats()
        if s is None:
            return
        blocks = GaugeMetricFamily("llm_mesh_kvstore_blocks", "Blocks held per tier", labels=["tier"])
        used = GaugeMetricFamily("llm_mesh_kvstore_bytes", "Bytes held per tier", labels=["tier"])
        total = GaugeMetricFamily("llm_mesh_kvstore_capacity_bytes", "Capacity per tier", labels=["tier"])
        for tier, t in (("ram", s.ram), ("disk", s.disk)):
            blocks.add_metric([tier], t.blocks)
            used.add_metric([tier], t.bytes_used)
            total.add_metric([tier], t.bytes_total)
        yield from (blocks, used, total)
        yield GaugeMetricFamily("llm_mesh_kvstore_pinned_blocks", "Blocks pinned now", value=s.pinned_blocks)
        yield GaugeMetricFamily("llm_mesh_kvstore_reserved_blocks", "Blocks reserved for writes now",
                                value=s.reserved_blocks)
        for name, field, help_text in _COUNTERS:
            yield CounterMetricFamily(name, help_text, value=getattr(s, field))
