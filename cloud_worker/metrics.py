"""Counters and latency percentiles a worker publishes in its heartbeat (``/workers/{workerId}``)."""

from __future__ import annotations

import threading
from collections import deque
from typing import Any

import numpy as np


class Metrics:
    """Thread-safe; latencies are kept for the most recent ``window`` results."""

    def __init__(self, window: int = 2000) -> None:
        self._lock = threading.Lock()
        self.counts = {"claimed": 0, "done": 0, "failed": 0, "retried": 0, "released": 0, "leaseLost": 0,
                       "batches": 0, "batchedJobs": 0}
        self.reasons: dict[str, int] = {}
        self._latency = deque(maxlen=window)

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.counts[name] = self.counts.get(name, 0) + n

    def failed(self, reason: str) -> None:
        with self._lock:
            self.counts["failed"] += 1
            self.reasons[reason] = self.reasons.get(reason, 0) + 1

    def done(self, latency_ms: float | None) -> None:
        with self._lock:
            self.counts["done"] += 1
            if latency_ms is not None and latency_ms >= 0:
                self._latency.append(latency_ms)

    def batch(self, size: int) -> None:
        with self._lock:
            self.counts["batches"] += 1
            self.counts["batchedJobs"] += size

    def snapshot(self) -> dict[str, Any]:
        with self._lock:
            lat = np.asarray(self._latency, dtype=np.float64)
            counts = dict(self.counts)
            reasons = dict(self.reasons)
        out: dict[str, Any] = dict(counts)
        out["failureReasons"] = reasons
        out["meanBatch"] = round(counts["batchedJobs"] / counts["batches"], 2) if counts["batches"] else 0.0
        if len(lat):
            out["latencyMs"] = {"p50": round(float(np.percentile(lat, 50)), 1),
                                "p95": round(float(np.percentile(lat, 95)), 1), "n": int(len(lat))}
        return out
