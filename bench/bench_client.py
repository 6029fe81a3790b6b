"""The patient app's speed: photo chosen -> device answer on screen in the browser (12 MP JPEG), beside
the bare device path that ``dermaloop diagnose`` runs and the app's own intake + answer in-process,
all in the same run; and the sync of 50 cases taken offline once the backend comes back.

    python bench/bench_client.py [--runs 5] [--cases 50] [--models DIR]

The device model is the starter (Lite0 int8, trained on the synthetic set if ``--models`` has none:
its weights do not change its speed) and the float32 analysis model, both built under ``--models``.
Prints one JSON object; docs/BENCHMARKS.md records the figures with this command.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.browser_support import LAUNCH_ARGS, AppProcess, open_flet, type_into  # noqa: E402
from tests.localbase_process import LocalbaseProcess  # noqa: E402


def _pcts(values: list[float]) -> dict[str, float]:
    values = sorted(values)
    return {"p50": round(statistics.median(values), 1), "p95": round(values[round(0.95 * (len(values) - 1))], 1),
            "n": len(values)}


def _photo(path: Path) -> bytes:
    from tests.example_photos import lesion_photo

    img, _ = lesion_photo((4000, 3000), (0.42, 0.4, 0.58, 0.62))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    path.write_bytes(buf.getvalue())
    return buf.getvalue()


def in_process(models: Path, jpeg_path: Path, runs: int) -> dict:
    from client.device import Device
    from client.photos import prepare
    from dermaloop.analysis.on_device import open_device_path
    from dermaloop.settings import load_settings

    bare = open_device_path(models)
    bare.run(jpeg_path)  # warm-up
    diagnose = []
    for _ in range(runs):
        t = time.perf_counter()
        bare.run(jpeg_path)
        diagnose.append((time.perf_counter() - t) * 1000)
    device = Device(load_settings(environ={}, models_dir=str(models)), Path(tempfile.mkdtemp()))
    data = jpeg_path.read_bytes()
    device.answer(prepare(data))
    app = []
    for _ in range(runs):
        t = time.perf_counter()
        device.answer(prepare(data, "photo.jpg"))
        app.append((time.perf_counter() - t) * 1000)
    return {"diagnose_path_ms": _pcts(diagnose), "app_intake_and_answer_ms": _pcts(app)}


def in_browser(models: Path, jpeg_path: Path, runs: int, tmp: Path) -> dict:
    from playwright.sync_api import expect, sync_playwright

    backend = LocalbaseProcess(data_dir=tmp / "lb").start()
    client = AppProcess("client", backend.settings(), ["--data-dir", str(tmp / "device")],
                        env_extra={"DERMALOOP_MODELS_DIR": str(models)}).start()
    times = []
    try:
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=LAUNCH_ARGS)
            page = browser.new_page(viewport={"width": 900, "height": 1100})
            expect.set_options(timeout=120_000)
            open_flet(page, client.url)
            type_into(page, "Email", "bench@dermaloop.test")
            type_into(page, "Password", "bench-pass-1")
            page.get_by_role("button", name="Create account").click()
            page.get_by_role("button", name="I agree").click()
            for _ in range(runs + 1):
                page.get_by_role("button", name="New case").click()
                with page.expect_file_chooser() as chooser:
                    page.get_by_role("button", name="Choose photo").click()
                t = time.perf_counter()
                chooser.value.set_files(str(jpeg_path))
                # wait_for reacts to the DOM change; expect() polls with growing gaps (up to 1 s)
                page.get_by_text("On-device answer").wait_for(timeout=120_000)
                times.append((time.perf_counter() - t) * 1000)
                page.get_by_role("button", name="Cancel").click()
            browser.close()
    finally:
        client.stop()
        backend.stop()
    return {"browser_photo_to_answer_ms": _pcts(times[1:])}  # the first one loads the models


def offline_sync(n: int, tmp: Path) -> dict:
    from client.store import LocalStore
    from client.sync import SyncEngine
    from dermaloop.auth import AuthClient
    from dermaloop.database import admin_reference
    from tests.worker_support import lesion_jpeg

    backend = LocalbaseProcess(data_dir=tmp / "lb-sync").start()
    settings = backend.settings()
    try:
        session = AuthClient(settings).sign_up("sync@dermaloop.test", "sync-pass-1")
        store = LocalStore(tmp / "sync-device")
        for i in range(n):
            store.add_case(session.uid, lesion_jpeg(i, (1600, 1200)), content_type="image/jpeg",
                           device=None, note=None, research_consent=False)
        backend.stop()
        engine = SyncEngine(store, session, settings)
        engine.start()
        time.sleep(2)  # offline: nothing can happen
        t = time.perf_counter()
        backend.start()
        root = admin_reference("/", settings, app_name="bench-client-sync")
        while len(root.child(f"cases/{session.uid}").get(shallow=True) or {}) < n or store.pending(session.uid):
            time.sleep(0.05)
        seconds = time.perf_counter() - t
        engine.stop()
    finally:
        backend.stop()
    return {"offline_cases": n, "sync_after_backend_returns_s": round(seconds, 2),
            "cases_per_s": round(n / seconds, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--cases", type=int, default=50)
    ap.add_argument("--models", type=Path, default=Path("var/bench-models"))
    args = ap.parse_args()
    from training.localiser_train import ensure_localiser
    from training.starter import ensure_starter_models

    ensure_starter_models(args.models)
    ensure_localiser(args.models)
    tmp = Path(tempfile.mkdtemp(prefix="bench-client-"))
    jpeg = tmp / "photo-12mp.jpg"
    _photo(jpeg)
    out = {"photo": "4000x3000 JPEG q90, synthetic spot", **in_process(args.models, jpeg, args.runs),
           **in_browser(args.models, jpeg, args.runs, tmp), **offline_sync(args.cases, tmp)}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
