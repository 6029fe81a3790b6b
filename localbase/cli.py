"""``dermaloop backend`` / ``python -m localbase``: start the embedded Firebase-compatible backend."""

from __future__ import annotations

import argparse
from pathlib import Path

from localbase.config import PROJECT_ROOT, defaults, emulator_ports


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options with defaults from firebase.json and the project's variables (see localbase.config)."""
    chosen = defaults()
    ports = emulator_ports()
    parser.add_argument("--data-dir", type=Path, default=chosen.data_dir / "localbase",
                        help="directory holding everything localbase stores (default: %(default)s)")
    parser.add_argument("--host", default=chosen.host, help="interface to bind (default: %(default)s)")
    parser.add_argument("--database-port", type=int, default=ports["database"],
                        help="Realtime Database port (default from firebase.json: %(default)s; 0 = any free)")
    parser.add_argument("--storage-port", type=int, default=ports["storage"],
                        help="Storage port (default from firebase.json: %(default)s; 0 = any free)")
    parser.add_argument("--auth-port", type=int, default=ports["auth"],
                        help="Auth port (default from firebase.json: %(default)s; 0 = any free)")
    parser.add_argument("--project-id", default=chosen.project_id, help="Firebase project id (default: %(default)s)")
    parser.add_argument("--rules-dir", type=Path, default=None,
                        help="directory holding database.rules.json and storage.rules (default: the project's)")


def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT/SIGTERM; the exit code says whether the ports could be bound."""
    from localbase import server

    return server.run(
        data_dir=args.data_dir,
        host=args.host,
        ports={"database": args.database_port, "storage": args.storage_port, "auth": args.auth_port},
        project_id=args.project_id,
        rules_dir=args.rules_dir or PROJECT_ROOT,
    )
