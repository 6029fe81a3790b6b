"""``dermaloop models``: the model registry for maintainers (list, show, history, publish, promote,
rollback).

Every pointer move goes through ``dermaloop.registry`` and leaves an audit entry naming who moved it
and why, so a changed model in front of patients can always be traced (change control). The same
commands work against localbase and real Firebase: the backend comes from the usual settings.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path
from typing import Any

from dermaloop import registry

# A model directory holds both the cloud and the device model; a localiser folder only itself.
DIRECTORY_KINDS = ("cloud", "device")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    listing = sub.add_parser("list", help="published versions, newest first, the current one marked")
    listing.add_argument("--kind", choices=registry.KINDS, action="append",
                         help="only this kind (repeatable; default: all)")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    show = sub.add_parser("show", help="one version's record: files, hashes, metrics, parent")
    show.add_argument("kind", choices=registry.KINDS)
    show.add_argument("version", nargs="?", help="default: the current version")
    hist = sub.add_parser("history", help="who moved the current pointer, when and why")
    hist.add_argument("kind", choices=registry.KINDS)
    hist.add_argument("--limit", type=int, default=50)
    pub = sub.add_parser("publish", help="upload a model directory as new versions (and make them current)")
    pub.add_argument("model_dir", type=Path)
    pub.add_argument("--kind", choices=registry.KINDS, action="append",
                     help="what to publish from it (default: cloud and device; a localiser folder: localiser)")
    pub.add_argument("--no-promote", action="store_true", help="upload only; move no pointer")
    pub.add_argument("--reason", default="", help="recorded in the audit entry")
    promote = sub.add_parser("promote", help="make a published version current")
    promote.add_argument("kind", choices=registry.KINDS)
    promote.add_argument("version")
    promote.add_argument("--reason", required=True, help="why (recorded in the audit entry)")
    back = sub.add_parser("rollback", help="go back to the version that was current before")
    back.add_argument("kind", choices=registry.KINDS)
    back.add_argument("--to", default=None, help="a named earlier version instead of the previous one")
    back.add_argument("--reason", required=True, help="why (recorded in the audit entry)")


def _when(ms: Any) -> str:
    if not isinstance(ms, (int, float)):
        return "-"
    return dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC).strftime("%Y-%m-%d %H:%M UTC")


def _headline(record: dict[str, Any]) -> str:
    """One figure a maintainer compares versions by: validation balanced accuracy if recorded."""
    metrics = record.get("metrics")
    if isinstance(metrics, dict) and isinstance(metrics.get("balanced_accuracy"), (int, float)):
        n = metrics.get("n")
        return f"bal.acc {metrics['balanced_accuracy']:.3f}" + (f" (n={n})" if n else "")
    return ""


def _demonstration(record: dict[str, Any]) -> bool:
    from dermaloop.model_dir import is_demonstration

    card = record.get("card")
    return isinstance(card, dict) and is_demonstration(card)


def _list(args: argparse.Namespace, app: Any) -> int:
    from firebase_admin import db

    for kind in args.kind or registry.KINDS:
        current = registry.current_version(kind, app=app)
        versions = db.reference(f"models/{kind}/versions", app=app).get() or {}
        rows = sorted(((v, r) for v, r in versions.items() if isinstance(r, dict)),
                      key=lambda vr: vr[1].get("createdAt") or 0, reverse=True)
        if args.json:
            for version, record in rows:
                print(json.dumps({"kind": kind, "version": version, "current": version == current,
                                  "createdAt": record.get("createdAt"), "parent": record.get("parent"),
                                  "publishedBy": record.get("publishedBy"), "metrics": record.get("metrics"),
                                  "demonstration": _demonstration(record)}))
            continue
        print(f"{kind}: current {current or '(none)'}")
        if not rows:
            print("  no published versions")
        for version, record in rows:
            mark = "*" if version == current else " "
            demo = "  DEMONSTRATION (synthetic data)" if _demonstration(record) else ""
            print(f" {mark} {version:<36} {_when(record.get('createdAt')):<21} parent {record.get('parent') or '-':<28}"
                  f" {_headline(record)}{demo}")
    return 0


def _show(args: argparse.Namespace, app: Any) -> int:
    version = args.version or registry.current_version(args.kind, app=app)
    if version is None:
        raise registry.RegistryError(f"no {args.kind} version is current; name one ('dermaloop models list')")
    record = registry.version_record(args.kind, version, app=app)
    if record is None:
        raise registry.RegistryError(f"{args.kind} version {version} is not published ('dermaloop models list')")
    record = dict(record, version=version, current=version == registry.current_version(args.kind, app=app))
    print(json.dumps(record, indent=2, sort_keys=True))
    return 0


def _history(args: argparse.Namespace, app: Any) -> int:
    entries = registry.history(args.kind, limit=args.limit, app=app)
    if not entries:
        print(f"{args.kind}: the pointer has never moved through the registry")
    for e in entries:
        why = f"  reason: {e['reason']}" if e.get("reason") else ""
        decision = f"  decision {e['decision']}" if e.get("decision") else ""
        print(f"{_when(e.get('at'))}  {e.get('action', '?'):<8} {e.get('previous') or '-'} -> {e.get('version')}"
              f"  by {e.get('by', '?')}{why}{decision}")
    return 0


def _publish(args: argparse.Namespace, app: Any) -> int:
    root: Path = args.model_dir
    if not root.is_dir():
        raise registry.RegistryError(f"{root} is not a directory")
    kinds = args.kind or (("localiser",) if not (root / "card.json").is_file() or _is_localiser(root)
                          else DIRECTORY_KINDS)
    for kind in kinds:
        published = registry.publish(root, kind, make_current=False, app=app)
        what = "uploaded" if published.created else "already published (identical files)"
        print(f"{kind} {published.version}: {what}, {len(published.files)} files")
        if not args.no_promote:
            previous = registry.promote(kind, published.version, reason=args.reason or f"published from {root}",
                                        app=app)
            print(f"{kind}: current {previous or '(none)'} -> {published.version}")
    return 0


def _is_localiser(root: Path) -> bool:
    try:
        return json.loads((root / "card.json").read_text()).get("kind") == "localiser"
    except (OSError, ValueError, AttributeError):
        return False


def _promote(args: argparse.Namespace, app: Any) -> int:
    previous = registry.promote(args.kind, args.version, reason=args.reason, app=app)
    print(f"{args.kind}: current {previous or '(none)'} -> {args.version}")
    return 0


def _rollback(args: argparse.Namespace, app: Any) -> int:
    before = registry.current_version(args.kind, app=app)
    now = registry.rollback(args.kind, to=args.to, reason=args.reason, app=app)
    print(f"{args.kind}: rolled back {before} -> {now}")
    return 0


ACTIONS = {"list": _list, "show": _show, "history": _history, "publish": _publish, "promote": _promote,
           "rollback": _rollback}


def run(args: argparse.Namespace) -> int:
    from firebase_admin import exceptions

    from dermaloop.admin_app import get_app
    from dermaloop.unreachable import explain

    try:
        return ACTIONS[args.action](args, get_app())
    except registry.RegistryError as exc:
        print(f"dermaloop models: {exc}", file=sys.stderr)
        return 1
    except (ValueError, OSError, exceptions.FirebaseError) as exc:
        line = explain(exc)
        print(f"dermaloop models: {line or exc}", file=sys.stderr)
        return 2 if line else 1
