"""Cloud-worker throughput (micro-batched vs one at a time) and upload-to-result latency.

A fresh localbase on free ports. Throughput: N cases are uploaded and queued first, then one
``dermaloop worker`` starts; jobs/s = N / (time from the first claim to the last result, taken from
the worker's own log). The baseline is the same worker with one job in flight and batch size 1,
measured in the same run. Latency: with a batched worker running, a patient (the real
``dermaloop submit`` code path: Auth REST, Storage /v0, rules-checked multi-path write) submits at
a steady offered rate; latency is from the moment the case and job write returned to the moment the
patient's own RTDB listener saw the result.

    nice -n 10 .venv/bin/python bench/bench_worker.py [--model MODEL_DIR] [--jobs 60] [--rate 2 --seconds 30]

Without ``--model`` it uses the newest model under $DERMALOOP_MODELS_DIR if there is one, else a tiny
Keras model (then the figures measure the machinery, not the production network). Images are
HAM10000 photos when the folder is present, else synthetic ones.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
import uuid
from datetime import datetime
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.localbase_process import LocalbaseProcess  # noqa: E402
from tests.worker_support import WorkerProcess, lesion_jpeg, seed_case, tiny_model_dir, wait_until  # noqa: E402

HAM = Path(os.environ.get("DERMALOOP_HAM10000", ROOT.parent / "shared/data/ham10000"))


def photos(n: int) -> tuple[list[bytes], str]:
    images = sorted((HAM / "images").glob("*.jpg"))[:n] if (HAM / "images").is_dir() else []
    if len(images) >= n:
        return [p.read_bytes() for p in images], f"HAM10000 photos ({len(images)}, 600x450 JPEG)"
    return [lesion_jpeg(i, (600, 450)) for i in range(n)], "synthetic 600x450 JPEGs"


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc), to show where the 2 cores go."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _ts(line: str) -> float | None:
    try:
        return datetime.strptime(json.loads(line)["ts"], "%Y-%m-%dT%H:%M:%S.%fZ").timestamp()
    except (ValueError, KeyError):
        return None


def throughput(lb, app, bucket, model_dir, data: list[bytes], flags: list[str], label: str) -> dict:
    uid = f"bench-{uuid.uuid4().hex[:6]}"
    ids = [f"{label}-{i:04d}-{uuid.uuid4().hex[:6]}" for i in range(len(data))]
    for case_id, photo in zip(ids, data, strict=True):
        seed_case(app, bucket, uid, case_id, photo)
    from firebase_admin import db

    worker = WorkerProcess(lb.settings(), model_dir, f"bench-{label}", ["--sweep-s", "1", *flags],
                           one_thread=False).start()
    cpu0 = (cpu_seconds(worker.proc.pid), cpu_seconds(lb.proc.pid))
    try:
        wait_until(lambda: all(c.get("status") in ("diagnosed", "failed")
                               for c in (db.reference(f"cases/{uid}", app=app).get() or {}).values())
                   and len(db.reference(f"cases/{uid}", app=app).get() or {}) == len(ids), "all cases", timeout=3600)
        cpu1 = (cpu_seconds(worker.proc.pid), cpu_seconds(lb.proc.pid))
    finally:
        worker.terminate()
    claimed = [_ts(line) for line in worker.lines if '"event": "claimed"' in line]
    done = [_ts(line) for line in worker.lines if '"event": "diagnosed"' in line]
    batches = [json.loads(line).get("batch") for line in worker.lines if '"event": "diagnosed"' in line]
    classified = [b for b in batches if b is not None]  # None: declined by the image checks, not classified
    elapsed = max(done) - min(claimed)
    return {"label": label, "jobs": len(done), "declined_by_checks": len(batches) - len(classified),
            "seconds": round(elapsed, 2), "jobs_per_s": round(len(done) / elapsed, 2),
            "mean_batch": round(float(np.mean(classified)), 1) if classified else None,
            # CPU per job includes the worker's idle start-up wait (small) and everything localbase did.
            "worker_cpu_ms_per_job": round((cpu1[0] - cpu0[0]) * 1000 / len(done)),
            "localbase_cpu_ms_per_job": round((cpu1[1] - cpu0[1]) * 1000 / len(done))}


def latency(lb, app, model_dir, data: list[bytes], rate: float, seconds: float, flags: list[str]) -> dict:
    from dermaloop.auth import create_user
    from dermaloop.submit_cli import Patient, describe_image

    settings = lb.settings()
    email, password = f"bench-{uuid.uuid4().hex[:6]}@dermaloop.test", "bench-pass-1"
    create_user(email, password, "patient", settings=settings)
    patient = Patient(email, password, settings)
    worker = WorkerProcess(settings, model_dir, "bench-latency", flags, one_thread=False).start()
    sent: dict[str, float] = {}
    seen: dict[str, float] = {}
    lock = threading.Lock()

    def on_change(case_id: str) -> None:
        now = time.time()
        with lock:
            if case_id in seen or case_id not in sent:
                return
        case = patient.case(case_id)
        if case and case.get("status") == "diagnosed":
            with lock:
                seen.setdefault(case_id, now)

    listener = patient.follow(on_change)
    described = [describe_image(d) for d in data]
    try:
        n = int(rate * seconds)
        start = time.monotonic()
        for i in range(n):
            time.sleep(max(0.0, start + i / rate - time.monotonic()))
            photo, (ctype, w, h) = data[i % len(data)], described[i % len(data)]
            submitted = patient.submit(photo, content_type=ctype, width=w, height=h)
            with lock:
                sent[submitted.case_id] = submitted.submitted_at
        wait_until(lambda: set(sent) <= set(seen), "every result to reach the patient", timeout=600)
        achieved = n / (time.monotonic() - start)
    finally:
        listener.close()
        worker.terminate()
    lat = np.array([seen[c] - sent[c] for c in sent]) * 1000.0
    return {"offered_per_s": rate, "submitted": len(sent), "achieved_submit_per_s": round(achieved, 2),
            "p50_ms": round(float(np.percentile(lat, 50))), "p95_ms": round(float(np.percentile(lat, 95))),
            "max_ms": round(float(lat.max()))}


def model_calls(model_dir: Path, data: list[bytes], repeats: int = 3) -> dict:
    """Model time per image (probabilities + Grad-CAM): the eager per-image path a naive worker takes
    (``model_dir`` predict, then ``gradcam.grad_cam``) vs the worker's compiled path, one image per
    call and 16 per call. Best of ``repeats``, after a warm-up call."""
    from cloud_worker.model import load_model
    from cloud_worker.pipeline import NoAnalysis, prepare
    from dermaloop.analysis.gradcam import grad_cam
    from dermaloop.preprocess import to_model_input

    model = load_model(model_dir)
    pixels = np.stack([to_model_input(prepare(d, NoAnalysis()).image, config=model.preprocess) for d in data[:16]])

    def best(fn, n: int) -> float:
        fn()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return round(min(times) * 1000 / n, 1)

    def eager_one() -> None:
        probs = model.inner.predict(pixels[:1])
        grad_cam(model.inner.model, pixels[0], int(np.argmax(probs[0])))

    return {"eager_one_ms_per_image": best(eager_one, 1),
            "compiled_one_ms_per_image": best(lambda: model.classify(pixels[:1]), 1),
            "compiled_batch16_ms_per_image": best(lambda: model.classify(pixels), 16)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="model directory (default: local models, else a tiny model)")
    parser.add_argument("--tiny", action="store_true", help="use the tiny test model (measures the machinery alone)")
    parser.add_argument("--jobs", type=int, default=60)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[4, 16],
                        help="jobs in flight = batch size for the batched runs (compared with 1 = one at a time)")
    parser.add_argument("--batch", type=int, default=8, help="jobs in flight = batch size for the latency run")
    parser.add_argument("--rate", type=float, default=2.0, help="offered load for the latency run, jobs/s")
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--no-analysis", action="store_true", help="skip the image checks in the worker")
    parser.add_argument("--model-calls-only", action="store_true",
                        help="only the model call per image (no localbase, no worker process)")
    args = parser.parse_args()

    from dermaloop.admin_app import get_app
    from dermaloop.settings import load_settings
    from dermaloop.storage import admin_bucket

    tmp = Path(tempfile.mkdtemp(prefix="bench-worker-"))
    model_dir = Path(args.model) if args.model else (tiny_model_dir(tmp / "tiny") if args.tiny else None)
    if model_dir is None:
        local = Path(load_settings().models_dir)
        from dermaloop.model_dir import newest_model_dir

        model_dir = newest_model_dir(local) or tiny_model_dir(tmp / "tiny")
    data, source = photos(args.jobs)
    common = ["--no-analysis"] if args.no_analysis else []
    print(f"model {model_dir}; images: {source}", flush=True)
    print(model_calls(model_dir, data), flush=True)
    if args.model_calls_only:
        return 0

    def fresh(phase: str, run):
        """Each phase on its own fresh localbase, so no phase pays for the queue another one left."""
        lb = LocalbaseProcess(data_dir=tmp / f"localbase-{phase}").start()
        try:
            app = get_app(lb.settings(), name=f"bench-{phase}")
            return run(lb, app, admin_bucket(lb.settings()))
        finally:
            lb.stop()

    one = fresh("one", lambda lb, app, bucket: throughput(
        lb, app, bucket, model_dir, data, [*common, "--workers", "1", "--batch-size", "1"], "one-at-a-time"))
    print(one, flush=True)
    for n in args.concurrency:
        many = fresh(f"b{n}", lambda lb, app, bucket, n=n: throughput(
            lb, app, bucket, model_dir, data, [*common, "--workers", str(n), "--batch-size", str(n)], f"batched-{n}"))
        print(many, f"speed-up {many['jobs_per_s'] / one['jobs_per_s']:.2f}x", flush=True)
    lat = fresh("latency", lambda lb, app, bucket: latency(
        lb, app, model_dir, data, args.rate, args.seconds,
        [*common, "--workers", str(args.batch), "--batch-size", str(args.batch)]))
    print(lat, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
