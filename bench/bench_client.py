"""The patient app's speed, all in one run so the rows compare:

- photo chosen -> device answer on screen in the browser (12 MP JPEG), for both ways the photo can
  reach the app (``client.intake``: the picker's HTTP upload, the default, and the websocket
  message it replaced), the apps side by side and their runs interleaved; beside them, in-process,
  the bare device path that ``dermaloop diagnose`` runs, the app's answer (small decode, answer,
  preview), the full-size copy it keeps (made in the background), and both in a row as the app
  did before;
- upload finished -> cloud result on screen: the patient presses "Save and send" in the browser, a
  real ``dermaloop worker`` diagnoses; the clock starts when an admin listener on the server's
  database sees the case + job write land (the sync engine's last step, after the photo is in
  Storage) and stops when Playwright finds the cloud result's text in the page's accessibility tree;
  beside it the worker's own figure from the same listener (write landed -> case ``diagnosed``);
- the sync of 50 cases taken offline once the backend comes back.

    python bench/bench_client.py [--runs 5] [--cases 50] [--models DIR] [--cloud-model DIR]
                                 [--baseline REV_OR_DIR ...] [--only in_process answer cloud offline_sync]

``--baseline`` adds an app to the rounds for each revision: the project as it was at that git
revision, or a directory holding a copy of the project with a change tried, so a change is measured
against what it replaced in the same run.

The device model is the starter (Lite0 int8, trained on the synthetic set if ``--models`` has none:
its weights do not change its speed) and the float32 analysis model, both built under ``--models``;
the worker serves the same directory's cloud model (Lite0 Keras) unless ``--cloud-model`` names
another. The load average is recorded before and after each phase (the machine is shared).
Prints one JSON object; docs/BENCHMARKS.md records the figures with this command.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from playwright.sync_api import TimeoutError as PlaywrightTimeout  # noqa: E402

from client.intake import TRANSFER_ENV, UPLOAD, WEBSOCKET  # noqa: E402
from tests.browser_support import LAUNCH_ARGS, AppProcess, open_flet, type_into  # noqa: E402
from tests.localbase_process import LocalbaseProcess  # noqa: E402

PHASES = ("in_process", "answer", "cloud", "offline_sync")
HAM = Path(os.environ.get("DERMALOOP_HAM10000", Path(__file__).resolve().parents[2] / "shared/data/ham10000"))
WAIT_MS = 600_000  # only stops a hung run; not a speed limit
STUCK_MS = 30_000  # the server has had the cloud result this long and the page still does not show it


def _pcts(values: list[float]) -> dict:
    values = sorted(values)
    return {"p50": round(statistics.median(values), 1), "p95": round(values[round(0.95 * (len(values) - 1))], 1),
            "n": len(values), "sorted": [round(v) for v in values]}


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _photo(path: Path) -> str:
    """A 12 MP phone-sized JPEG the checks accept: a HAM10000 lesion photo scaled to 4000x3000 with
    sensor-like grain (so the file is as large as a phone's, ~2.5 MB), when the data set is here.
    Without it, a drawn spot, which the device's not-skin check declines: the answer then skips the
    classifier and the cloud result is a "photograph it again" message."""
    import numpy as np
    from PIL import Image

    first = sorted((HAM / "images").glob("*.jpg"))[:1] if (HAM / "images").is_dir() else []
    if first:
        with Image.open(first[0]) as src:
            big = np.asarray(src.convert("RGB").resize((4000, 3000), Image.Resampling.BICUBIC), np.float32)
        grain = np.random.default_rng(0).normal(0, 6, big.shape)
        img = Image.fromarray(np.clip(big + grain, 0, 255).astype(np.uint8))
        what = f"HAM10000 {first[0].name} scaled to 4000x3000 with grain"
    else:
        from tests.example_photos import lesion_photo

        img, _ = lesion_photo((4000, 3000), (0.42, 0.4, 0.58, 0.62))
        what = "synthetic spot 4000x3000 (declined by the not-skin check)"
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=90)
    path.write_bytes(buf.getvalue())
    return f"{what}, JPEG q90, {len(buf.getvalue()) / 1e6:.1f} MB"


def in_process(models: Path, jpeg_path: Path, runs: int, tmp: Path) -> dict:
    from client.device import Device, preview_png
    from client.photos import decode, prepare
    from dermaloop.analysis.on_device import open_device_path
    from dermaloop.settings import load_settings

    bare = open_device_path(models)
    bare.run(jpeg_path)  # warm-up
    device = Device(load_settings(environ={}, models_dir=str(models)), tmp / "device-in-process")
    data = jpeg_path.read_bytes()
    device.answer(prepare(data))

    def app_answer() -> None:  # what the app does before the answer screen goes out
        image = decode(data, "photo.jpg", draft=True)
        preview_png(image, device.answer(image).get("box"))

    def full_intake() -> None:  # the same before the copy to keep was made in the background
        photo = prepare(data, "photo.jpg")
        preview_png(photo.image, device.answer(photo).get("box"))

    steps = {"diagnose_path_ms": lambda: bare.run(jpeg_path), "app_answer_ms": app_answer,
             "app_kept_copy_ms": lambda: prepare(data, "photo.jpg"), "app_full_intake_answer_ms": full_intake}
    times: dict[str, list[float]] = {k: [] for k in steps}
    for _ in range(runs):  # interleaved: a busy moment of the machine hits every row
        for key, step in steps.items():
            t = time.perf_counter()
            step()
            times[key].append((time.perf_counter() - t) * 1000)
    return {key: _pcts(values) for key, values in times.items()}


def _tree_at(rev: str, tmp: Path) -> Path:
    """The project as it was at ``rev``, for a baseline app in the same run (``git archive`` only
    reads the repository); a directory is taken as it is (a copy of the project with a change tried)."""
    import subprocess
    import tarfile

    if Path(rev).is_dir():
        return Path(rev).resolve()
    root = Path(__file__).resolve().parents[1]
    tree = tmp / f"tree-{rev}"
    tree.mkdir()
    archive = subprocess.run(["git", "-C", str(root), "archive", rev], capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(tree, filter="data")
    return tree


class ServerWatch:
    """When each job lands and each case is done, as an admin listener on the server's database sees
    them (a stream event a few milliseconds after the write: docs/BENCHMARKS.md, RTDB section)."""

    def __init__(self, settings) -> None:
        from dermaloop.database import LocalCopy, admin_reference

        self.copy = LocalCopy()
        self.landed: dict[str, float] = {}
        self.done: dict[str, tuple[float, str, float | None]] = {}
        self._lock = threading.Lock()
        self._registration = admin_reference("/", settings, app_name="bench-client-watch").listen(self._on)

    def _on(self, event) -> None:
        from dermaloop.database import Event

        now = time.perf_counter()
        self.copy.apply(Event(event.event_type, event.path, event.data))
        root = self.copy.value or {}
        with self._lock:
            for case_id in root.get("jobs") or {}:
                self.landed.setdefault(case_id, now)
            for patient in (root.get("cases") or {}).values():
                for case_id, case in (patient or {}).items():
                    if isinstance(case, dict) and case.get("status") in ("diagnosed", "failed"):
                        work = ((case.get("cloud") or {}).get("timingsMs") or {}).get("total")
                        self.done.setdefault(case_id, (now, case["status"], work))

    def finished_since(self, known: set[str]) -> tuple[str, float, float, str, float | None]:
        """The one case that landed after ``known`` was taken, once it is done: id, landed, done, status
        and the worker's own time on it (``cloud.timingsMs.total``: from its work starting to the result)."""
        deadline = time.monotonic() + WAIT_MS / 1000
        while time.monotonic() < deadline:
            with self._lock:
                new = [c for c in self.landed if c not in known and c in self.done]
                if new:
                    (case_id,) = new
                    return case_id, self.landed[case_id], *self.done[case_id]
            time.sleep(0.01)
        raise RuntimeError("the server never saw the case finished")

    def jobs(self) -> set[str]:
        with self._lock:
            return set(self.landed)

    def close(self) -> None:
        # firebase-admin's stream thread raises when its response is closed under it: not news.
        thread, hook = getattr(self._registration, "_thread", None), threading.excepthook
        threading.excepthook = lambda args: None if args.thread is thread else hook(args)
        try:
            self._registration.close()
        finally:
            threading.excepthook = hook


def _signed_up(browser, url: str, email: str):
    page = browser.new_page(viewport={"width": 900, "height": 1100})
    open_flet(page, url)
    type_into(page, "Email", email)
    type_into(page, "Password", "bench-pass-1")
    page.get_by_role("button", name="Create account").click()
    page.get_by_role("button", name="I agree").click()
    page.get_by_role("button", name="New case").wait_for(timeout=WAIT_MS)
    return page


def _photo_to_answer(page, jpeg_path: Path) -> tuple[float, float]:
    """Milliseconds from the file handed to the page to (progress or answer on screen, answer on screen)."""
    page.bring_to_front()  # two apps share the browser: the one measured is the tab in front
    page.get_by_role("button", name="New case").click()
    with page.expect_file_chooser() as chooser:
        page.get_by_role("button", name="Choose photo").click()
    answer = page.get_by_text("On-device answer")
    t = time.perf_counter()
    chooser.value.set_files(str(jpeg_path))
    # wait_for reacts to the DOM change; expect() polls with growing gaps (up to 1 s)
    page.get_by_text("Checking the photo on this device").or_(answer).first.wait_for(timeout=WAIT_MS)
    feedback = (time.perf_counter() - t) * 1000
    answer.wait_for(timeout=WAIT_MS)
    return feedback, (time.perf_counter() - t) * 1000


def _send_and_follow(page, jpeg_path: Path, watch: ServerWatch, worker) -> dict[str, float] | Path:
    """One case from photo to cloud result on screen; milliseconds from the case + job write landing
    to the result in the page (browser) and to the case diagnosed (server), and from the press of
    "Save and send" to the result in the page (click: adds the photo's upload to Storage). A page
    that still does not show the result ``STUCK_MS`` after the server had it is a finding, not a
    slow run: its screenshot's path is returned and the page is sent back to the case list."""
    _photo_to_answer(page, jpeg_path)
    known = watch.jobs()
    send = page.get_by_role("button", name="Save and send").or_(
        page.get_by_role("button", name="Send to a dermatologist anyway")).first
    shown = page.get_by_text("Cloud model version:").or_(page.get_by_text("Analysis failed")).first
    clicked = time.perf_counter()
    send.click()
    deadline = time.perf_counter() + WAIT_MS / 1000
    while True:
        try:
            shown.wait_for(timeout=STUCK_MS)
            break
        except PlaywrightTimeout:
            new = watch.jobs() - known
            finished = [watch.done[c][0] for c in new if c in watch.done]
            if finished and time.perf_counter() - finished[0] > STUCK_MS / 1000:
                shot = Path(tempfile.mkdtemp(prefix="bench-client-stuck-")) / "page.png"
                page.screenshot(path=str(shot))
                page.get_by_role("button", name="Back to my cases").click()
                return shot
            if time.perf_counter() > deadline:
                raise
    seen = time.perf_counter()
    case_id, landed, done, status, work = watch.finished_since(known)
    if status != "diagnosed":
        raise RuntimeError(f"the worker failed case {case_id}:\n" + "".join(worker.lines[-20:]))
    page.get_by_role("button", name="Back to my cases").click()
    return {"browser": (seen - landed) * 1000, "server": (done - landed) * 1000, "click": (seen - clicked) * 1000,
            "work": float(work or 0)}


def in_browser(models: Path, cloud_model: Path, jpeg_path: Path, runs: int, tmp: Path,
               baselines: tuple[str, ...] = (), phases: tuple[str, ...] = ("answer", "cloud")) -> dict:
    from playwright.sync_api import sync_playwright

    from tests.worker_support import WorkerProcess

    backend = LocalbaseProcess(data_dir=tmp / "lb").start()
    settings = backend.settings()
    worker = WorkerProcess(settings, cloud_model, "bench-client", one_thread=False,
                           env_extra={"DERMALOOP_MODELS_DIR": str(models)}).launch() if "cloud" in phases else None
    # The app as it is, the same with the photo sent over the websocket, and optionally the app as
    # it was at a git revision (its own code first on the path, the current directory left off it).
    arms = {UPLOAD: {TRANSFER_ENV: UPLOAD}, WEBSOCKET: {TRANSFER_ENV: WEBSOCKET}}
    for rev in baselines:
        arms[f"at {rev}"] = {"PYTHONSAFEPATH": "1", "PYTHONPATH": str(_tree_at(rev, tmp))}
    transfers = tuple(arms)
    apps = {t: AppProcess("client", settings, ["--data-dir", str(tmp / f"device-{i}")],
                          env_extra={"DERMALOOP_MODELS_DIR": str(models.resolve()), **arms[t]})
            for i, t in enumerate(transfers)}
    feedback: dict[str, list[float]] = {t: [] for t in transfers}
    answer: dict[str, list[float]] = {t: [] for t in transfers}
    cloud: dict[str, dict[str, list[float]]] = {t: {"browser": [], "server": [], "click": [], "work": []}
                                                for t in transfers}
    stuck: dict[str, list[str]] = {t: [] for t in transfers}
    watch = None
    try:
        for app in apps.values():
            app.start()
        if worker is not None:
            worker.wait_ready()
        watch = ServerWatch(settings)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=LAUNCH_ARGS)
            pages = {t: _signed_up(browser, apps[t].url, f"bench-{i}@dermaloop.test") for i, t in enumerate(transfers)}
            out: dict = {}
            load_answer = [_load()]
            for i in range(runs + 1 if "answer" in phases else 0):  # the first round loads the models: not counted
                k = i % len(transfers)
                for t in transfers[k:] + transfers[:k]:  # each arm goes first in turn
                    first, ms = _photo_to_answer(pages[t], jpeg_path)
                    pages[t].get_by_role("button", name="Cancel").click()
                    if i:
                        feedback[t].append(first)
                        answer[t].append(ms)
            load_answer.append(_load())
            if "answer" in phases:
                out.update({
                    "browser_photo_to_answer_ms": {t: _pcts(answer[t]) for t in transfers},
                    "browser_photo_to_progress_or_answer_ms": {t: _pcts(feedback[t]) for t in transfers},
                    "load_before_after_answer_runs": load_answer})

            # The app as it is and each baseline, each case sent and followed to its result.
            cloud_arms = [t for t in transfers if t != WEBSOCKET]
            load_cloud = [_load()]
            for i in range(runs + 1 if "cloud" in phases else 0):  # the first round compiles the worker: not counted
                k = i % len(cloud_arms)
                for arm in cloud_arms[k:] + cloud_arms[:k]:  # each arm goes first in turn
                    times = _send_and_follow(pages[arm], jpeg_path, watch, worker)
                    if isinstance(times, Path):
                        stuck[arm].append(str(times))
                        continue
                    for key, ms in times.items():
                        if i:
                            cloud[arm][key].append(ms)
            load_cloud.append(_load())
            if "cloud" in phases:
                out.update({
                    "cloud_model": str(cloud_model),
                    "upload_landed_to_cloud_result_in_browser_ms": {t: _pcts(cloud[t]["browser"]) for t in cloud_arms},
                    "upload_landed_to_diagnosed_on_server_ms": {t: _pcts(cloud[t]["server"]) for t in cloud_arms},
                    "save_and_send_to_cloud_result_in_browser_ms": {t: _pcts(cloud[t]["click"]) for t in cloud_arms},
                    "worker_time_on_the_job_ms": {t: _pcts(cloud[t]["work"]) for t in cloud_arms},
                    "cloud_result_never_shown": {t: stuck[t] for t in cloud_arms},
                    "load_before_after_cloud_runs": load_cloud})
            browser.close()
    except BaseException:
        if worker is not None:
            print("worker output (tail):\n" + "".join(worker.lines[-30:]), file=sys.stderr)
        print("app output (tail):\n" + "".join(apps[UPLOAD].lines[-30:]), file=sys.stderr)
        raise
    finally:
        if watch is not None:
            watch.close()
        for app in apps.values():
            app.stop()
        if worker is not None:
            worker.terminate()
        backend.stop()
    return out


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
    ap.add_argument("--cloud-model", type=Path, default=None,
                    help="the worker's model directory (default: the newest under --models)")
    ap.add_argument("--baseline", metavar="REV_OR_DIR", nargs="+", default=[],
                    help="also time the app as it was at these git revisions (or in these project copies)")
    ap.add_argument("--only", nargs="+", choices=PHASES, default=list(PHASES), help="run only these phases")
    args = ap.parse_args()
    from training.localiser_train import ensure_localiser
    from training.starter import ensure_starter_models

    model_dir = ensure_starter_models(args.models)
    ensure_localiser(args.models)
    tmp = Path(tempfile.mkdtemp(prefix="bench-client-"))  # removed at the end (stuck-page screenshots stay)
    jpeg = tmp / "photo-12mp.jpg"
    try:
        out: dict = {"photo": _photo(jpeg), "load_at_start": _load()}
        if "in_process" in args.only:
            out.update(in_process(args.models, jpeg, args.runs, tmp))
        browser_phases = tuple(p for p in ("answer", "cloud") if p in args.only)
        if browser_phases:
            out.update(in_browser(args.models, args.cloud_model or model_dir, jpeg, args.runs, tmp,
                                  tuple(args.baseline), browser_phases))
        if "offline_sync" in args.only:
            out.update(offline_sync(args.cases, tmp))
        out["load_at_end"] = _load()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
