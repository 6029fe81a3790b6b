"""Time from 1,000 new dermatologist labels to a promoted model on the fast path (issue 19).

A fresh localbase on free ports. HAM10000 photos pose as everything: a base set (``--base`` images,
whole lesions) on which a current model is trained with ``dermaloop train`` (fast path: linear heads,
Lite0 device model, Lite2 + Lite0 cloud ensemble with flip TTA; not part of the figures), and new
labels from other lesions: each uploaded as a patient's photo with research consent and reviewed
(true HAM label, usable for training) by a dermatologist who holds the role in Auth. Then
``training.retrain.retrain`` runs (the code behind ``dermaloop retrain``), timed per step:

* gather   reading the cases, checking each label, downloading and hash-checking the photos;
* dataset  building the manifest (hashing every base image) and publishing it;
* train    the candidate: penultimate features (cached per network and image), last-layer refit,
           temperature/thresholds, Keras save, TFLite fp32 + int8 export;
* evaluate current and candidate on the benchmark and the held-out new labels, reports, gates;
* publish  both versions uploaded, promoted, cases labelled.

Round 1 is the first retraining after a model is published: every base image goes through the
networks once (the feature cache is cold). Round 2 adds another ``--new`` labels: the steady state,
where only the new photos need a forward pass. ``--open-gates`` opens every tolerance so that the
publish step is timed when the gates would refuse (it then times the mechanics, not a decision).
The int8 gate is reported but not enforced
(``--int8-max-drop 100``): a fast-path linear head loses 6-7 points under int8
(docs/MODEL_REPORT.md), which the gate rightly refuses; this benchmark measures time.

    nice -n 10 .venv/bin/python bench/bench_retrain.py [--base 2000] [--new 1000] [--rounds 2] [--work DIR]
        [--first-batch K] [--open-gates]

Skips, saying why, without the HAM10000 folder ($DERMALOOP_HAM10000 or ../shared/data/ham10000).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.localbase_process import LocalbaseProcess  # noqa: E402

HAM = Path(os.environ.get("DERMALOOP_HAM10000", ROOT.parent / "shared/data/ham10000"))


def _lesions(rows: list[dict]) -> list[str]:
    """Lesion ids in a fixed pseudo-random order (sha256 of the id), the same on every machine."""
    return sorted({r["lesion_id"] for r in rows}, key=lambda s: hashlib.sha256(s.encode()).hexdigest())


def subsets(work: Path, base_n: int, new_n: int, rounds: int) -> tuple[Path, list[list[dict]]]:
    """A HAM10000-layout base folder of about ``base_n`` images (whole lesions), and ``rounds``
    batches of ``new_n`` rows from other lesions (the new labels)."""
    with open(HAM / "metadata.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    by_lesion: dict[str, list[dict]] = {}
    for r in rows:
        by_lesion.setdefault(r["lesion_id"], []).append(r)
    base_rows, new_rows = [], []
    for lesion in _lesions(rows):
        (base_rows if len(base_rows) < base_n else new_rows).extend(by_lesion[lesion])
    base = work / "base"
    (base / "images").mkdir(parents=True, exist_ok=True)
    for r in base_rows:
        link = base / "images" / f"{r['image_id']}.jpg"
        if not link.exists():
            link.symlink_to(HAM / "images" / f"{r['image_id']}.jpg")
    with open(base / "metadata.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["image_id", "lesion_id", "dx"])
        writer.writeheader()
        writer.writerows({k: r[k] for k in ("image_id", "lesion_id", "dx")} for r in base_rows)
    batches = [new_rows[i * new_n:(i + 1) * new_n] for i in range(rounds)]
    if any(len(b) < new_n for b in batches):
        raise SystemExit(f"HAM10000 has too few images for {rounds} x {new_n} new labels beside {base_n} base images")
    return base, batches


def seed_labels(settings, app, bucket, rows: list[dict], derm: str) -> float:
    """Each row as a patient's case (photo uploaded, research consent) reviewed by ``derm``
    (true label, usable for training), written as the apps would leave them; returns seconds."""
    from firebase_admin import db

    from dermaloop import cases
    from dermaloop.database import new_push_id
    from dermaloop.taxonomy import load_taxonomy

    labels = load_taxonomy().ids
    started = time.perf_counter()
    now = int(time.time() * 1000)
    root = db.reference("/", app=app)
    for i, r in enumerate(rows):
        data = (HAM / "images" / f"{r['image_id']}.jpg").read_bytes()
        uid, case_id = f"bench-p{uuid.uuid4().hex[:10]}", new_push_id()
        bucket.blob(cases.image_object(uid, case_id)).upload_from_string(data, content_type="image/jpeg")
        image = cases.image_record(uid, case_id, hashlib.sha256(data).hexdigest(), "image/jpeg", len(data), 400, 300)
        case = cases.new_case(uid, case_id, image, True, created_at=now - 60_000)
        review = cases.review_record(derm, r["dx"], "Benchmark label.", "routine", taxonomy_labels=labels,
                                     at=now + i, confidence="high", training_use=True)
        root.update({cases.case_path(uid, case_id): case})
        root.update(cases.reviewed_writes(uid, case_id, review, new_push_id(), in_queue=False))
    return time.perf_counter() - started


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", type=int, default=2000, help="base images (whole lesions)")
    parser.add_argument("--new", type=int, default=1000, help="new labels per round")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--first-batch", type=int, default=0,
                        help="skip this many batches of new labels (fresh photos for a later invocation)")
    parser.add_argument("--open-gates", action="store_true",
                        help="tolerances wide open, so the publish step is timed even when the gates would refuse")
    parser.add_argument("--work", type=Path, default=None, help="work folder (default: a temporary one, removed)")
    parser.add_argument("--model", type=Path, default=None, help="current model directory (default: train one)")
    args = parser.parse_args()
    if not (HAM / "metadata.csv").is_file():
        print(f"skipped: HAM10000 not found at {HAM} (set DERMALOOP_HAM10000); the benchmark needs real photos")
        return 0
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    work = args.work or Path(tempfile.mkdtemp(prefix="bench-retrain-"))
    work.mkdir(parents=True, exist_ok=True)
    base, batches = subsets(work, args.base, args.new, args.first_batch + args.rounds)
    batches = batches[args.first_batch:]

    from dermaloop import auth as dl_auth
    from dermaloop import registry
    from dermaloop.admin_app import get_app
    from dermaloop.cli import main as cli
    from dermaloop.storage import admin_bucket
    from training.candidate import RefitConfig
    from training.compare import GateConfig
    from training.retrain import RetrainOptions, retrain

    model = args.model
    if model is None:
        model = work / "m0"
        if not (model / "card.json").is_file():
            t0 = time.perf_counter()
            code = cli(["train", "--data", str(base), "--out", str(model), "--cloud-ensemble", "--views", "orig,flip",
                        "--cache-dir", str(work / "train-cache"), "--quiet"])
            if code != 0:
                print("training the current model failed")
                return 1
            print(f"current model trained in {time.perf_counter() - t0:.0f} s (not part of the figures)")
    server = LocalbaseProcess(data_dir=work / "localbase").start()
    report: dict = {"base_images": None, "new_per_round": args.new, "open_gates": args.open_gates, "rounds": []}
    try:
        settings = server.settings(data_dir=work / "var")
        app, bucket = get_app(settings), admin_bucket(settings)
        for kind in ("device", "cloud"):
            registry.publish(model, kind, app=app, bucket=bucket, make_current=True, published_by="bench")
        user, _ = dl_auth.create_user(f"bench-derm-{uuid.uuid4().hex[:6]}@example.com", "secret123", "dermatologist",
                                      settings=settings)
        out = work / "retrain"
        gate_config = GateConfig(int8_max_drop=100.0)
        if args.open_gates:
            gate_config = GateConfig(ba_tolerance=1.0, sensitivity_tolerance=1.0, ece_bound=1.0, int8_max_drop=100.0)
        for n, batch in enumerate(batches, 1):
            seeded = seed_labels(settings, app, bucket, batch, user.uid)
            lines: list[str] = []
            opts = RetrainOptions(data=base, out=out, by="bench", progress=False, say=lines.append,
                                  refit=RefitConfig(progress=False), gates=gate_config)
            t0 = time.perf_counter()
            result = retrain(opts, app=app, bucket=bucket)
            total = time.perf_counter() - t0
            base_images = json.loads((out / "runs" / result.run_id / "manifest.json").read_text())["base"]["images"]
            report["base_images"] = base_images
            record = json.loads((out / "runs" / result.run_id / "decision.json").read_text())
            row = {"round": n + args.first_batch, "new_labels": result.new_labels, "seed_seconds": round(seeded, 1),
                   "total_seconds": round(total, 1), **{k: round(v, 1) for k, v in result.timings.items()},
                   "status": result.status, "version": result.version,
                   "gates": {g["gate"]: g["passed"] for g in record["gates"]},
                   "benchmark": {k: {s: (record["metrics"]["benchmark"][k][s] or {}).get("balanced_accuracy")
                                     for s in ("current", "candidate")} for k in ("cloud", "device")}}
            report["rounds"].append(row)
            print("\n".join(lines))
            print(json.dumps(row, indent=1))
    finally:
        server.stop()
    load = os.getloadavg()
    report["load_average_after"] = [round(v, 2) for v in load]
    (work / "bench_retrain.json").write_text(json.dumps(report, indent=1))
    print(f"\nbase {report['base_images']} images; new labels per round {args.new}; load average {load[0]:.2f}")
    print("| round | new labels | gather | dataset | train | evaluate | publish | total | status |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in report["rounds"]:
        print(f"| {r['round']} | {r['new_labels']} | {r.get('gather', 0):.0f} s | {r.get('dataset', 0):.0f} s | "
              f"{r.get('train', 0):.0f} s | {r.get('evaluate', 0):.0f} s | {r.get('publish', 0):.0f} s | "
              f"{r['total_seconds']:.0f} s | {r['status']} |")
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
