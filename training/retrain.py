"""``dermaloop retrain``: from dermatologists' new labels to a gated, promoted model version.

One run::

    current models  the versions /models/{device,cloud}/current name, fetched and hash-checked
    gather          every usable label (training.new_labels), photos downloaded and hash-checked
    dataset         the new dataset version: base + labels, frozen benchmark (training.dataset_versions);
                    published before anything is trained on it
    train           the candidate (training.candidate: last-layer refit from the current versions by
                    default, any `dermaloop train` recipe on request), in a temporary folder
    evaluate        current and candidate on the benchmark and the held-out new labels
                    (training.compare); reports into the candidate, renamed into place when complete
    decide          the gates (training.gates) -> the decision record /retrainRuns/{runId}, pass or fail
    publish         on pass: both versions published with make_current=False, then promoted (each
                    pointer moved only if it still names the version the candidate was compared with)
    label           the cases taken move to ``labelled`` (training.dataset_versions.mark_cases_labelled)

Killed at any point (kill -9 included), the next run resumes from the last finished step when its
inputs (dataset version, current versions, recipe) are unchanged, or, if they changed, marks the old
run superseded and starts over; a run that already passed its gates is always finished as decided.
Publishing is atomic per version and idempotent, so a resumed run never publishes twice nor half.
``--dry-run`` does everything but write to the backend (no dataset, record, publish, promotion or
labelling; the decision is printed and kept in the run folder).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from dermaloop import registry
from dermaloop.admin_handles import acting_user, server_handles
from dermaloop.model_dir import ModelDir
from dermaloop.settings import Settings
from dermaloop.taxonomy import Taxonomy, load_taxonomy
from training import gates
from training.candidate import (
    RECIPES,
    CandidateError,
    RefitConfig,
    Row,
    finish_candidate,
    recipe_candidate,
    refit_candidate,
    train_arguments,
)
from training.compare import GateConfig, evaluate_pair, metrics_table, run_gates, write_candidate_reports
from training.decisions import (
    RunState,
    find_unfinished,
    new_run_id,
    run_lock,
    skipped_counts,
    update_record,
    write_record,
)
from training.refit import EmbeddingCache, RefitError

__all__ = ["RetrainOptions", "RunResult", "RetrainError", "NoNewLabels", "retrain", "watch", "CRASH_ENV"]

CRASH_ENV = "DERMALOOP_RETRAIN_CRASH_AT"  # tests: SIGKILL ourselves right after the named step
KINDS = ("device", "cloud")


class RetrainError(RuntimeError):
    """The run cannot start or go on; the message says what to do. Nothing half-done is published."""


class NoNewLabels(RetrainError):
    """Fewer new usable labels than asked for: nothing to retrain on."""


@dataclass
class RetrainOptions:
    data: Path  # the base dataset (the folder the current model was trained on)
    out: Path  # run folders, fetched models, photo and feature caches
    taxonomy: str = "ham10000"
    recipe: str = "refit"
    dry_run: bool = False
    min_new_labels: int = 1
    parent_dataset: str | None = None  # default: the dataset version the current model was trained on
    by: str | None = None  # who or what ran it (default user@host)
    refit: RefitConfig = field(default_factory=RefitConfig)
    gates: GateConfig = field(default_factory=GateConfig)
    progress: bool = True
    say: Callable[[str], None] | None = None


@dataclass
class RunResult:
    run_id: str
    status: str  # refused | done | dry-run-pass | dry-run-refused
    promoted: bool
    version: str
    dataset_version: str
    decision: dict[str, Any]
    new_labels: int
    timings: dict[str, float]
    metrics: dict[str, Any] = field(default_factory=dict)
    resumed: bool = False


def _crash_point(step: str) -> None:
    if os.environ.get(CRASH_ENV) == step:
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)


def _say(opts: RetrainOptions, msg: str) -> None:
    (opts.say or (lambda m: print(m, flush=True)))(msg)


def _current_models(opts: RetrainOptions, app: Any, bucket: Any) -> tuple[dict[str, str], dict[str, ModelDir]]:
    versions: dict[str, str] = {}
    for kind in KINDS:
        v = registry.current_version(kind, app=app)
        if v is None:
            raise RetrainError(f"no current {kind} model: /models/{kind}/current names none. Publish and promote "
                               "one first (dermaloop models publish, or dermaloop run publishes the model it serves)")
        versions[kind] = v
    dirs = {}
    for kind, v in versions.items():
        try:
            path = registry.fetch(kind, v, opts.out / "models" / kind, app=app, bucket=bucket)
        except registry.RegistryError as exc:
            raise RetrainError(f"cannot fetch the current {kind} model {v}: {exc}") from exc
        dirs[kind] = ModelDir.open(path)
    return versions, dirs


def _parent_dataset(opts: RetrainOptions, current: dict[str, ModelDir]) -> str | None:
    if opts.parent_dataset:
        return opts.parent_dataset
    for kind in KINDS:
        v = (current[kind].card.get("data") or {}).get("dataset_version")
        if isinstance(v, str) and v:
            return v
    return None


def _rows(manifest, opts: RetrainOptions, taxonomy: Taxonomy) -> list[Row]:
    from training.dataset_versions import DatasetError

    try:
        rows = manifest.rows(opts.data, opts.out / "labels", verify=False)
    except DatasetError as exc:
        raise RetrainError(str(exc)) from exc
    return [Row(r.id, r.path, taxonomy.index(r.label), r.split, r.group, r.source, r.sha256) for r in rows]


def _inputs(opts: RetrainOptions, manifest_version: str, versions: dict[str, str]) -> dict[str, Any]:
    r = opts.refit
    return {"dataset": manifest_version, "current": versions, "recipe": opts.recipe, "dry_run": opts.dry_run,
            "c": r.c, "calibration_images": r.calibration_images, "shuffle_labels": r.shuffle_labels,
            "train_args": list(r.train_args), "gates": asdict(opts.gates)}


def _run_state(opts: RetrainOptions, inputs: dict[str, Any], by: str, app: Any) -> tuple[RunState, bool]:
    """The unfinished run to resume, or a new one (an unfinished run with other inputs is superseded,
    unless it already passed its gates: that one is finished first, as decided)."""
    runs = opts.out / "runs"
    old = find_unfinished(runs)
    if old is not None and (old.inputs == inputs or old.done("passed")):
        return old, True
    if old is not None:
        _say(opts, f"an interrupted run {old.run_id} had other inputs; starting over (it is marked superseded)")
        if old.done("record") and not old.inputs.get("dry_run"):
            update_record(old.run_id, {"status": "superseded", "supersededReason":
                                       "interrupted; a later run started over with other inputs"}, app=app)
        old.finished = True
        old.steps["superseded"] = True
        old.save()
        shutil.rmtree(old.folder / "candidate", ignore_errors=True)
        shutil.rmtree(old.folder / "candidate.partial", ignore_errors=True)
    _prune(runs)
    run_id = new_run_id()
    state = RunState(run_id, runs / run_id, int(time.time() * 1000), by, inputs,
                     version=f"rt{run_id[:15]}-{inputs['dataset'][3:9]}")
    dry = None if inputs["dry_run"] else _matching_dry_run(runs, inputs)
    if dry is not None:  # a dry run just made this very candidate: take it rather than train it again
        _say(opts, f"      taking the candidate of dry run {dry.run_id} (same inputs)")
        state.folder.mkdir(parents=True)
        shutil.copytree(dry.folder / "candidate", state.folder / "candidate")
        shutil.copy2(dry.folder / "evaluation.json", state.folder / "evaluation.json")
        state.version = dry.version
        state.steps["candidate"] = dry.version
        state.steps["from_dry_run"] = dry.run_id
    state.save()
    return state, False


KEEP_CANDIDATES = 3  # finished runs whose candidate folders stay on disk (the newest); records stay forever


def _prune(runs: Path) -> None:
    """Delete the model files of all but the newest finished runs (published versions live in the
    registry; every run keeps its state, manifest, evaluation and decision files)."""
    if not runs.is_dir():
        return
    finished = [st for st in (RunState.load(p) for p in sorted(runs.iterdir(), reverse=True) if p.is_dir())
                if st is not None and st.finished]
    for st in finished[KEEP_CANDIDATES:]:
        for name in ("candidate", "candidate.partial", "trained", "train-data"):
            shutil.rmtree(st.folder / name, ignore_errors=True)


def _matching_dry_run(runs: Path, inputs: dict[str, Any]) -> RunState | None:
    """The newest finished dry run whose inputs equal these (but for dry_run), with its candidate."""
    if not runs.is_dir():
        return None
    want = {**inputs, "dry_run": True}
    for folder in sorted((p for p in runs.iterdir() if p.is_dir()), reverse=True):
        state = RunState.load(folder)
        if state is None or not state.finished or state.inputs != want:
            continue
        if (folder / "candidate" / "card.json").is_file() and (folder / "evaluation.json").is_file():
            return state
    return None


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, default=str))
    os.replace(tmp, path)


def _build_candidate(opts: RetrainOptions, state: RunState, current: dict[str, ModelDir], rows: list[Row],
                     manifest, taxonomy: Taxonomy, cache: EmbeddingCache, versions: dict[str, str],
                     seen: dict[str, list[str]], timings: dict[str, float]) -> dict[str, Any]:
    """Train, evaluate and complete the candidate; returns the evaluation (also saved in the run folder)."""
    tmp, final = state.folder / "candidate.partial", state.folder / "candidate"
    lineage = {"dataset_version": manifest.version, "dataset_parent": manifest.parent,
               "base": (manifest.base or {}).get("name"), "counts": manifest.counts(), "retrain_run": state.run_id,
               "parent_versions": versions}
    t0 = time.perf_counter()
    try:
        if opts.recipe == "refit":
            refit_candidate(current, rows, version=state.version, tmp=tmp, taxonomy=taxonomy, cache=cache,
                            cfg=opts.refit, lineage=lineage)
        else:
            recipe_candidate(rows, version=state.version, tmp=tmp, work=state.folder, taxonomy=taxonomy,
                             cfg=opts.refit, lineage=lineage, cache_dir=opts.out / "cache" / "pipeline")
    except RefitError as exc:
        raise RetrainError(f"{exc}") from exc
    except CandidateError as exc:
        raise RetrainError(str(exc)) from exc
    timings["train"] = time.perf_counter() - t0
    _crash_point("train")
    _say(opts, f"[5/7] evaluating current and candidate on the benchmark "
               f"({sum(r.split == 'benchmark' for r in rows)} images) and the held-out new labels "
               f"({sum(r.split == 'new_holdout' for r in rows)})")
    t0 = time.perf_counter()
    ev = evaluate_pair(current, ModelDir.open(tmp), rows, cache, progress=opts.progress,
                       device_answer=opts.gates.device_answer)
    verdicts = run_gates(ev, taxonomy, opts.gates, benchmark_seen=seen)
    updates = write_candidate_reports(ev, tmp, taxonomy, state.version, manifest.version)
    decision = gates.decide(verdicts)
    updates.setdefault("", {})["retrain"] = {"run": state.run_id, "decision": decision.promote,
                                             "reason": decision.reason[:2000]}
    finish_candidate(tmp, final, updates)
    timings["evaluate"] = time.perf_counter() - t0
    evaluation = {"decision": decision.to_json(), "metrics": metrics_table(ev, taxonomy),
                  "scoring": {side: {s: {a: {"how": sc.how, "seconds": round(sc.seconds, 2), **sc.extra}
                                         for a, sc in split.items()} for s, split in store.items()}
                              for side, store in (("current", ev.current), ("candidate", ev.candidate))}}
    _write_json(state.folder / "evaluation.json", evaluation)
    return evaluation


def _decision_from(evaluation: dict[str, Any]) -> gates.Decision:
    d = evaluation["decision"]
    verdicts = tuple(gates.GateVerdict(g["gate"], g["passed"], g["reason"], g.get("numbers") or {},
                                       g.get("advisory", False)) for g in d["gates"])
    return gates.Decision(bool(d["promote"]), d["reason"], verdicts)


def _publish_and_promote(opts: RetrainOptions, state: RunState, versions: dict[str, str], app: Any, bucket: Any,
                         by: str, evaluation: dict[str, Any]) -> dict[str, Any]:
    candidate = state.folder / "candidate"
    published = {}
    for kind in KINDS:
        if not state.done(f"published.{kind}"):
            bench = evaluation["metrics"]["benchmark"][kind]["candidate"]
            result = registry.publish(candidate, kind, state.version, parent=versions[kind], make_current=False,
                                      metrics=bench, published_by=by, app=app, bucket=bucket)
            state.mark(f"published.{kind}", {"created": result.created})
            _crash_point(f"publish.{kind}")
        published[kind] = state.version
    update_record(state.run_id, {"status": "published", "published": published}, app=app)
    previous = {}
    for kind in KINDS:
        if state.done(f"promoted.{kind}"):
            previous[kind] = state.steps[f"promoted.{kind}"]
            continue
        now = registry.current_version(kind, app=app)
        if now == state.version:  # promoted before a crash, before the step was saved
            previous[kind] = versions[kind]
        elif now != versions[kind]:
            raise RetrainError(f"/models/{kind}/current moved from {versions[kind]} to {now} during the run: the "
                               f"candidate was compared with {versions[kind]}, not with {now}. Not promoted; "
                               "run dermaloop retrain again to compare with the version serving now")
        else:
            previous[kind] = registry.promote(kind, state.version, by=by, decision=state.run_id,
                                              reason=f"retraining run {state.run_id}: every gate passed", app=app)
        state.mark(f"promoted.{kind}", previous[kind])
        _crash_point(f"promote.{kind}")
    update_record(state.run_id, {"status": "promoted", "promoted": {"version": state.version, "previous": previous}},
                  app=app)
    return previous


def retrain(opts: RetrainOptions, *, app: Any = None, bucket: Any = None, settings: Settings | None = None,
            gathered: Any = None) -> RunResult:
    """One retraining run (module docstring). Raises :class:`RetrainError` (or :class:`NoNewLabels`)
    with a plain message when it cannot run; the gates refusing is a result, not an error."""
    from training.dataset_versions import (
        DatasetError,
        benchmark_trained_on,
        build_manifest,
        fetch_case_images,
        load_manifest,
        mark_cases_labelled,
        publish_dataset,
    )
    from training.new_labels import GatherError, gather_labels

    if opts.recipe not in RECIPES:
        raise RetrainError(f"unknown recipe {opts.recipe!r}: choose {' or '.join(RECIPES)}")
    if not Path(opts.data).exists():
        raise RetrainError(f"base dataset {opts.data} does not exist: give the folder the current model was trained on")
    try:
        taxonomy = load_taxonomy(opts.taxonomy)
    except (ValueError, OSError, KeyError) as exc:
        raise RetrainError(f"unknown taxonomy {opts.taxonomy!r}: {exc}") from exc
    if opts.recipe == "train":
        try:
            train_arguments(opts.refit.train_args, opts.out, opts.out, taxonomy.name, opts.out, False)
        except CandidateError as exc:
            raise RetrainError(str(exc)) from exc
    app, bucket = server_handles(app, bucket, settings)
    by = acting_user(opts.by)
    timings: dict[str, float] = {}
    with run_lock(opts.out):
        _say(opts, "[1/7] current models")
        versions, current = _current_models(opts, app, bucket)
        _say(opts, f"      device {versions['device']}, cloud {versions['cloud']}")

        _say(opts, "[2/7] gathering labelled cases")
        t0 = time.perf_counter()
        if gathered is None:
            try:
                gathered = gather_labels(opts.out / "labels", app=app, bucket=bucket, taxonomy=taxonomy,
                                         include_labelled=True, progress=opts.progress)
            except GatherError as exc:
                raise RetrainError(str(exc)) from exc
        parent_name = _parent_dataset(opts, current)
        try:
            parent = load_manifest(parent_name, app=app, bucket=bucket) if parent_name else None
        except DatasetError as exc:
            raise RetrainError(f"the parent dataset version: {exc}") from exc
        before = {i.case_id for i in parent.case_images()} if parent is not None else set()
        new = [i for i in gathered.images if i.case_id not in before]
        timings["gather"] = time.perf_counter() - t0
        _say(opts, f"      {len(gathered.images)} usable labels, {len(new)} new since dataset "
                   f"{parent_name or '(none: first retraining)'}; {len(gathered.skipped)} reviewed cases left out")
        for reason, n in list(skipped_counts(gathered.skipped).items())[:6]:
            _say(opts, f"        {n} x {reason}")
        pending = find_unfinished(opts.out / "runs")
        finishing = pending is not None and pending.done("passed")  # it is finished whatever arrived since
        if len(new) < opts.min_new_labels and not finishing:
            raise NoNewLabels(f"{len(new)} new usable labels, fewer than the {opts.min_new_labels} asked for "
                              "(--min-new-labels): nothing to retrain on")

        _say(opts, "[3/7] dataset version")
        t0 = time.perf_counter()
        try:
            manifest = build_manifest(opts.data, gathered.images, parent=parent, taxonomy=taxonomy)
        except DatasetError as exc:
            raise RetrainError(str(exc)) from exc
        seen: dict[str, list[str] | str] = {}
        for kind in KINDS:
            try:
                seen[kind] = benchmark_trained_on(manifest, current[kind].root)
            except DatasetError as exc:  # no split.json: what it saw is unknown, which the gate refuses
                seen[kind] = str(exc)
        state, resumed = _run_state(opts, _inputs(opts, manifest.version, versions), by, app)
        if state.done("passed"):  # finish as decided, with the dataset the decision was made on
            manifest = load_manifest(state.inputs["dataset"], app=app, bucket=bucket)
            versions = dict(state.inputs["current"])
            fetch_case_images(manifest, opts.out / "labels", bucket=bucket)  # a cleared cache
        if resumed:
            _say(opts, f"      resuming run {state.run_id} (done: {', '.join(state.steps) or 'nothing yet'})")
        if not opts.dry_run and not state.done("dataset"):
            try:
                publish_dataset(manifest, app=app, bucket=bucket, created_by=by)
            except DatasetError as exc:
                raise RetrainError(str(exc)) from exc
            state.mark("dataset", manifest.version)
        (state.folder / "manifest.json").write_bytes(manifest.raw)
        counts = manifest.counts()["bySplit"]
        timings["dataset"] = time.perf_counter() - t0
        _say(opts, f"      {manifest.version} ({'not published: dry run' if opts.dry_run else 'published'}): "
                   + ", ".join(f"{k} {v}" for k, v in counts.items()))
        _crash_point("dataset")

        rows = _rows(manifest, opts, taxonomy)
        cache = EmbeddingCache(opts.out / "cache" / "features")
        if state.done("candidate") and (state.folder / "candidate" / "card.json").is_file():
            _say(opts, f"[4/7] candidate {state.version} already trained and evaluated (resumed)")
            evaluation = json.loads((state.folder / "evaluation.json").read_text())
        else:
            _say(opts, f"[4/7] training candidate {state.version} (recipe {opts.recipe}"
                       + (", labels SHUFFLED on purpose" if opts.refit.shuffle_labels else "") + ")")
            evaluation = _build_candidate(opts, state, current, rows, manifest, taxonomy, cache, versions, seen,
                                          timings)
            state.mark("candidate", state.version)
        decision = _decision_from(evaluation)

        _say(opts, f"[6/7] decision: {'PROMOTE' if decision.promote else 'REFUSED'}")
        for v in decision.verdicts:
            _say(opts, f"      {'pass' if v.passed else 'FAIL'}{' (advisory)' if v.advisory else ''} {v.gate}: "
                       f"{v.reason}")
        record = {"startedAt": state.started_at, "by": by, "host": acting_user().split("@")[-1],
                  "dryRun": opts.dry_run, "status": "passed" if decision.promote else "refused",
                  "inputs": {"baseDataset": (manifest.base or {}).get("name"), "datasetVersion": manifest.version,
                             "parentDataset": manifest.parent, "current": versions, "recipe": opts.recipe,
                             "recipeOptions": {k: v for k, v in state.inputs.items()
                                               if k in ("c", "calibration_images", "shuffle_labels", "train_args")},
                             "newLabels": len(new), "casesTaken": len(manifest.case_images()),
                             "casesSkipped": skipped_counts(gathered.skipped)},
                  "candidate": {"version": state.version, "dir": str(state.folder / "candidate")},
                  "metrics": evaluation["metrics"], "gates": [v.to_json() for v in decision.verdicts],
                  "decision": {"promote": decision.promote, "reason": decision.reason},
                  "timings": {k: round(v, 1) for k, v in timings.items()}}
        _write_json(state.folder / "decision.json", record)
        if not opts.dry_run and not state.done("record"):
            write_record(state.run_id, record, app=app)
            state.mark("record")
        if not opts.dry_run and decision.promote and not state.done("passed"):
            state.mark("passed")  # from here on the run is finished as decided, whatever arrives meanwhile
        _crash_point("record")

        result = RunResult(state.run_id, "refused", False, state.version, manifest.version, record["decision"],
                           len(new), timings, evaluation["metrics"], resumed)
        if opts.dry_run:
            _say(opts, f"[7/7] dry run: nothing published, promoted or labelled; decision in "
                       f"{state.folder / 'decision.json'}")
            state.finished = True
            state.save()
            result.status = "dry-run-pass" if decision.promote else "dry-run-refused"
            return result
        if not decision.promote:
            _say(opts, f"[7/7] not promoted; decision record /retrainRuns/{state.run_id}")
            state.finished = True
            state.save()
            return result

        _say(opts, f"[7/7] publishing and promoting {state.version}")
        t0 = time.perf_counter()
        try:
            _publish_and_promote(opts, state, versions, app, bucket, by, evaluation)
            if not state.done("labelled"):
                marked = mark_cases_labelled(manifest, app=app)
                state.mark("labelled", {"labelled": len(marked.labelled), "already": len(marked.already),
                                        "skipped": len(marked.skipped)})
                update_record(state.run_id, {"status": "done", "labelled": state.steps["labelled"]}, app=app)
        except Exception as exc:  # the record says the run stopped, and why; rerunning resumes it
            with contextlib.suppress(Exception):
                update_record(state.run_id, {"status": "failed", "error": f"{type(exc).__name__}: {exc}"[:2000]},
                              app=app)
            if isinstance(exc, (registry.RegistryError, RetrainError, DatasetError)):
                raise RetrainError(f"{exc} (run dermaloop retrain again to finish run {state.run_id})") from exc
            raise
        timings["publish"] = time.perf_counter() - t0
        update_record(state.run_id, {"timings": {k: round(v, 1) for k, v in timings.items()}}, app=app)
        state.finished = True
        state.save()
        _say(opts, f"      promoted {state.version} (device and cloud); {state.steps['labelled']['labelled']} "
                   "cases labelled")
        result.status, result.promoted = "done", True
        return result


# ---- watching for labels --------------------------------------------------------------------------------


def _watch_file(out: Path) -> Path:
    return out / "watch.json"


def watch(opts: RetrainOptions, every: int, *, poll_seconds: float = 60.0, app: Any = None, bucket: Any = None,
          settings: Settings | None = None, stop: threading.Event | None = None,
          max_runs: int | None = None) -> list[RunResult]:
    """Start a run whenever ``every`` usable labels have arrived that the last run (passed or not)
    did not see. Polls every ``poll_seconds``; a failed run is reported and the watch goes on."""
    from training.new_labels import GatherError, gather_labels

    if every < 1:
        raise RetrainError("--watch takes a positive number of new labels")
    app, bucket = server_handles(app, bucket, settings)
    taxonomy = load_taxonomy(opts.taxonomy)
    stop = stop or threading.Event()
    results: list[RunResult] = []
    path = _watch_file(opts.out)
    try:
        seen = set(json.loads(path.read_text()).get("cases") or [])
        first = False
    except (OSError, ValueError):
        seen, first = set(), True
    _say(opts, f"watching for {every} new usable labels (every {poll_seconds:g} s); Ctrl-C stops")
    while not stop.is_set():
        try:
            gathered = gather_labels(opts.out / "labels", app=app, bucket=bucket, taxonomy=taxonomy,
                                     include_labelled=True, progress=False)
        except GatherError as exc:
            _say(opts, f"watch: cannot gather labels ({exc}); trying again")
            stop.wait(poll_seconds)
            continue
        ids = {i.case_id for i in gathered.images}
        if first:  # the labels the serving model's dataset holds do not count as new
            try:
                versions, current = _current_models(opts, app, bucket)
                from training.dataset_versions import load_manifest

                parent = _parent_dataset(opts, current)
                seen = {i.case_id for i in load_manifest(parent, app=app, bucket=bucket).case_images()} if parent \
                    else set()
            except Exception as exc:  # noqa: BLE001 - reported; the watch keeps going
                _say(opts, f"watch: {exc}")
            first = False
        fresh = ids - seen
        if len(fresh) >= every:
            _say(opts, f"watch: {len(fresh)} new usable labels; starting a run")
            try:
                results.append(retrain(replace(opts, by="watch", min_new_labels=1), app=app, bucket=bucket,
                                       gathered=gathered))
            except RetrainError as exc:
                _say(opts, f"watch: the run did not complete: {exc}")
            except Exception as exc:  # noqa: BLE001 - a bug or an outage must not end the watch
                import traceback

                _say(opts, f"watch: the run failed unexpectedly: {exc!r}\n{traceback.format_exc()}")
            seen |= ids
            _write_json(path, {"cases": sorted(seen), "at": int(time.time() * 1000)})
            if max_runs is not None and len(results) >= max_runs:
                break
        stop.wait(poll_seconds)
    return results
