"""The ``dermaloop`` command: one entry point whose subcommands live beside the code they drive.

Each subcommand is a module with ``add_arguments(parser)`` and ``run(args) -> int``. Modules are
imported only when their subcommand runs, so ``dermaloop --help`` stays fast and a component's heavy
dependencies (TensorFlow, Flet) load only for the commands that need them.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Command:
    name: str
    module: str | None  # None: planned, not built yet
    help: str
    planned_in: str = ""


# A component plugs in by adding its line here (and, if it is a long-running service, to
# dermaloop/services.py so that ``dermaloop run`` starts it).
COMMANDS: tuple[Command, ...] = (
    Command("run", "dermaloop.run", "start the whole system on the embedded backend (or real Firebase)"),
    Command("backend", "localbase.cli", "start localbase: the embedded Firebase-compatible backend"),
    Command("users", "dermaloop.users_cli", "manage accounts and roles (works on localbase and Firebase)"),
    Command("train", "training.train_cli", "train the device and cloud models into a model directory"),
    Command("retrain", "training.retrain_cli", "retrain on dermatologists' new labels; promote only if the gates pass"),
    Command("evaluate", "training.evaluate_cli", "evaluate a model directory on a dataset; write a report"),
    Command("export", "training.export_cli", "export a trained model to TFLite (int8 and fp32)"),
    Command("lr-find", "training.lr_find_cli", "learning-rate range test for fine-tuning"),
    Command("diagnose", "dermaloop.diagnose_cli", "run the on-device diagnosis path on image files"),
    Command("worker", "cloud_worker.cli", "run the cloud worker that diagnoses uploaded cases"),
    Command("submit", "dermaloop.submit_cli", "submit images as a patient would (scriptable client)"),
    Command("client", "client.app", "run the patient app (Flet web): instant on-device answer, cloud result, chat"),
    Command("portal", "reviewer_portal.app", "run the dermatologists' reviewer portal (Flet web): triage, review, chat"),
    Command("models", "dermaloop.models_cli", "model registry: list, show, history, publish, promote, rollback"),
)


def _available(command: Command) -> bool:
    if command.module is None:
        return False
    try:
        return importlib.util.find_spec(command.module) is not None
    except ModuleNotFoundError:
        return False


def _overview() -> str:
    lines = ["commands:"]
    for command in COMMANDS:
        note = "" if _available(command) else f"  [not built yet: {command.planned_in or 'pending'}]"
        lines.append(f"  {command.name:<10} {command.help}{note}")
    lines.append("")
    lines.append("Run 'dermaloop COMMAND --help' for a command's options.")
    return "\n".join(lines)


def build_parser(command: Command | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dermaloop",
        description="DermaLoop: skin-lesion triage with on-device and cloud models. Not a diagnosis.",
        epilog=_overview(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    if command is None:
        parser.add_argument("command", nargs="?", metavar="COMMAND", help="one of the commands below")
        return parser
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub_parser = sub.add_parser(command.name, help=command.help, description=command.help)
    if _available(command):
        importlib.import_module(command.module).add_arguments(sub_parser)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # TensorFlow's C++ start-up chatter (CPU features, oneDNN) buries what people need to read;
    # warnings and errors still show. Children of ``dermaloop run`` inherit this.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    argv = list(sys.argv[1:] if argv is None else argv)
    by_name = {c.name: c for c in COMMANDS}
    chosen = by_name.get(argv[0]) if argv else None
    if chosen is None:
        parser = build_parser()
        if argv and not argv[0].startswith("-"):
            parser.error(f"unknown command {argv[0]!r}")
        parser.parse_args(argv)
        parser.print_help()
        return 0
    if not _available(chosen):
        print(
            f"dermaloop {chosen.name}: not built yet ({chosen.planned_in or 'pending'}). "
            "See docs/ARCHITECTURE.md for where it will fit.",
            file=sys.stderr,
        )
        return 2
    args = build_parser(chosen).parse_args(argv)
    module = importlib.import_module(chosen.module)
    try:
        return int(module.run(args) or 0)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # the backend is down or unreachable: one line, not a traceback
        from dermaloop.unreachable import explain

        line = explain(exc)
        if line is None:
            raise
        print(f"dermaloop {chosen.name}: {line}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
