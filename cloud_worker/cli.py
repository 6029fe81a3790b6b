"""``dermaloop worker``: run the cloud worker (or, with ``--status``, show every worker's heartbeat).

Prints a line containing ``worker ready`` once the model is loaded and the job listener is
connected (``dermaloop run`` waits for it). SIGTERM or Ctrl-C stops it gracefully: no new claims,
in-flight jobs get ``--grace`` seconds to finish, the rest of the leases are released.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

log = logging.getLogger("cloud_worker")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", metavar="MODEL_DIR", default=None,
                        help="serve this model directory and do not follow /models/cloud/current "
                             "(default: the published current version, else the newest local model "
                             "directory under $DERMALOOP_MODELS_DIR)")
    parser.add_argument("--workers", type=int, default=8, metavar="N",
                        help="jobs in flight at once in this process; their images share micro-batched "
                             "model calls (default 8). Run the command again for more processes or machines.")
    parser.add_argument("--batch-size", type=int, default=16, help="most images per model call (1 = one at a time)")
    parser.add_argument("--batch-wait-ms", type=int, default=30,
                        help="how long a batch may wait for claimed jobs that are still downloading")
    parser.add_argument("--lease-s", type=float, default=30.0, help="lease length; renewed while a job runs")
    parser.add_argument("--max-attempts", type=int, default=3, help="attempts before a case is marked failed")
    parser.add_argument("--backoff-s", type=float, default=2.0, help="first retry delay (doubles per attempt)")
    parser.add_argument("--sweep-s", type=float, default=5.0, help="interval of the sweep for missed/expired jobs")
    parser.add_argument("--heartbeat-s", type=float, default=5.0, help="interval of the /workers heartbeat")
    parser.add_argument("--grace-s", type=float, default=10.0, help="on SIGTERM, time given to in-flight jobs")
    parser.add_argument("--worker-id", default=None, help="name in leases and /workers (default host-pid-random)")
    parser.add_argument("--no-heatmaps", action="store_true", help="skip Grad-CAM heatmaps")
    parser.add_argument("--no-analysis", action="store_true",
                        help="skip the quality, not-skin and localiser checks (records say null: not checked)")
    parser.add_argument("--status", action="store_true", help="print every worker's heartbeat and metrics, then exit")
    parser.add_argument("--json-logs", action="store_true", default=None,
                        help="one JSON object per log line (default when stdout is not a terminal)")


class JsonFormatter(logging.Formatter):
    """Structured logs: one JSON object per line, with the event's fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "event": record.getMessage(),
        }
        entry.update(getattr(record, "fields", {}) or {})
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, "fields", {}) or {}
        extra = " ".join(f"{k}={v}" for k, v in fields.items())
        text = f"{time.strftime('%H:%M:%S')} {record.levelname.lower():7} {record.getMessage()} {extra}".rstrip()
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        return text


def setup_logging(json_logs: bool | None) -> None:
    handler = logging.StreamHandler(sys.stdout)
    use_json = (not sys.stdout.isatty()) if json_logs is None else json_logs
    handler.setFormatter(JsonFormatter() if use_json else TextFormatter())
    # The shared library's loggers (dermaloop.registry: model downloads and loads, failures) speak
    # in the worker's format too, rather than in Python's bare last-resort one on stderr.
    for logger in (log, logging.getLogger("dermaloop")):
        logger.handlers[:] = [handler]
        logger.setLevel(logging.INFO)
        logger.propagate = False


def _status(app) -> int:
    from firebase_admin import db

    workers = db.reference("workers", app=app).get() or {}
    now = time.time() * 1000
    for beat in workers.values():
        if isinstance(beat, dict) and isinstance(beat.get("updatedAt"), (int, float)):
            # A worker killed with -9 leaves its last heartbeat behind: show how old each one is.
            beat["secondsSinceHeartbeat"] = round((now - beat["updatedAt"]) / 1000, 1)
    print(json.dumps(workers, indent=2, sort_keys=True))
    return 0


def run(args: argparse.Namespace) -> int:
    setup_logging(args.json_logs)
    from cloud_worker.erasure import Eraser, ErasureConfig
    from cloud_worker.jobs import JobQueue
    from cloud_worker.model import ModelLoadError, load_model
    from cloud_worker.registry import ModelProvider
    from cloud_worker.worker import Worker, WorkerConfig
    from dermaloop.admin_app import get_app
    from dermaloop.model_dir import newest_model_dir
    from dermaloop.registry import RegistryError, current_version, fetch
    from dermaloop.settings import load_settings
    from dermaloop.storage import admin_bucket

    settings = load_settings()
    app = get_app(settings)
    if args.status:
        return _status(app)
    for name in ("workers", "batch_size", "max_attempts"):
        if getattr(args, name) < 1:
            print(f"dermaloop worker: --{name.replace('_', '-')} must be at least 1", file=sys.stderr)
            return 2
    bucket = admin_bucket(settings)
    cache_dir = Path(settings.models_dir) / "cache" / "cloud"
    follow = args.model is None
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    worker_id = args.worker_id or f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:4]}"
    # "Delete my data" requests (issue 17) need no model: carried out from the start, beside the jobs.
    eraser = Eraser(app, bucket, worker_id, ErasureConfig(
        sweep_interval_s=args.sweep_s, job_wait_s=max(60.0, 4 * args.lease_s))).start()

    def find_model() -> Path | None:
        if args.model:
            return Path(args.model)
        version = current_version("cloud", app=app)
        if version:
            try:
                return fetch("cloud", version, cache_dir, app=app, bucket=bucket)
            except RegistryError as exc:  # e.g. a file changed after publication: refuse it, serve a local one
                log.error("cannot fetch the published model; trying the local models directory",
                          extra={"fields": {"version": version, "error": str(exc)}})
        return newest_model_dir(settings.models_dir)

    model_dir = find_model()
    if model_dir is None:
        # Start anyway (``dermaloop run`` must come up on a fresh machine): jobs stay queued, safely,
        # until a model is published or appears in the local models directory.
        log.warning("worker ready, waiting for a model: nothing published at /models/cloud/current and no model "
                    "directory under the models directory; jobs stay queued until one appears",
                    extra={"fields": {"modelsDir": str(settings.models_dir)}})
        while model_dir is None and not stop.wait(5.0):
            try:
                model_dir = find_model()
            except Exception as exc:
                log.warning("looking for a model failed", extra={"fields": {"error": str(exc)}})
        if model_dir is None:
            eraser.stop()
            return 0
    try:
        model = load_model(model_dir)
    except ModelLoadError as exc:
        eraser.stop()
        print(f"dermaloop worker: cannot load the model: {exc}", file=sys.stderr)
        return 2
    models = ModelProvider(model, load_model)
    analysis = _analysis(args.no_analysis, Path(settings.models_dir))
    jobs = JobQueue(app, worker_id, lease_ms=int(args.lease_s * 1000), max_attempts=args.max_attempts)
    config = WorkerConfig(
        concurrency=args.workers, batch_size=args.batch_size, batch_wait_ms=args.batch_wait_ms,
        lease_ms=int(args.lease_s * 1000), max_attempts=args.max_attempts, backoff_ms=int(args.backoff_s * 1000),
        sweep_interval_s=args.sweep_s, heartbeat_s=args.heartbeat_s, shutdown_grace_s=args.grace_s,
        heatmaps=not args.no_heatmaps,
        # Fault injection for the crash-recovery tests; never set in production.
        fault_hold_s=float(os.environ.get("DERMALOOP_WORKER_FAULT_HOLD_S") or 0),
    )
    worker = Worker(app, bucket, jobs, models, analysis, config)
    worker.start()
    if follow:
        models.follow(app, bucket, cache_dir)
    log.info("worker ready", extra={"fields": {"workerId": worker_id, "model": model.version,
                                                "modelDir": str(model_dir), "following": follow,
                                                "concurrency": config.concurrency, "batchSize": config.batch_size,
                                                "analysis": getattr(analysis, "description", "not checked")}})
    while not stop.wait(0.5):
        pass
    models.stop()
    eraser.stop()
    worker.stop()
    deadline = time.monotonic() + 2.0
    for thread in threading.enumerate():
        if thread is not threading.main_thread() and not thread.daemon:
            thread.join(max(0.0, deadline - time.monotonic()))
    leftovers = [t for t in threading.enumerate() if t is not threading.main_thread() and not t.daemon and t.is_alive()]
    if leftovers:  # e.g. a listener thread of firebase-admin stuck on a dead connection: do not hang
        log.warning("exiting with threads still blocked", extra={"fields": {"threads": [t.name for t in leftovers]}})
        sys.stdout.flush()
        os._exit(0)
    return 0


def _analysis(disabled: bool, models_dir: Path):
    from cloud_worker.pipeline import NoAnalysis

    if disabled:
        return NoAnalysis()
    try:
        from cloud_worker.checks import load_checks

        return load_checks(models_dir)
    except (ImportError, FileNotFoundError, ValueError, OSError) as exc:
        log.warning("image checks unavailable; records will say null (not checked)", extra={"fields": {"error": str(exc)}})
        return NoAnalysis()
