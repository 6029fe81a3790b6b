"""``dermaloop backend`` / ``python -m localbase``: start the embedded Firebase-compatible backend.

On the loopback interface (the default) it runs in emulator mode, the Firebase emulator protocols as
the client libraries expect them; listening beyond it (``--host 0.0.0.0`` or a LAN address) turns
secure mode on: signed tokens, admin only from this machine or with the admin credential in the
data directory, CORS for named origins only, per-client limits (docs/ARCHITECTURE.md).
"""

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
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--secure", action="store_true", default=None,
                      help="secure mode even on the loopback interface (default: secure exactly when --host "
                           "is beyond loopback)")
    mode.add_argument("--insecure", action="store_true",
                      help="emulator mode even beyond loopback: anyone who reaches it is admin (a loud warning)")
    parser.add_argument("--cert", type=Path, default=None, help="TLS certificate chain (PEM); with --key, serve HTTPS")
    parser.add_argument("--key", type=Path, default=None, help="TLS private key (PEM) for --cert")
    parser.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                        help="secure mode: a web origin (https://host:port) whose pages may read answers; "
                             "repeatable (default: none; emulator mode answers every origin)")
    parser.add_argument("--no-local-trust", action="store_true",
                        help="secure mode: do not treat connections from this machine as admin-capable and "
                             "exempt from per-client limits (use it behind a reverse proxy on this machine)")


def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT/SIGTERM; the exit code says whether the ports could be bound."""
    from localbase import server

    return server.run(
        data_dir=args.data_dir,
        host=args.host,
        ports={"database": args.database_port, "storage": args.storage_port, "auth": args.auth_port},
        project_id=args.project_id,
        rules_dir=args.rules_dir or PROJECT_ROOT,
        secure=True if args.secure else None,
        insecure=args.insecure,
        cert=args.cert,
        key=args.key,
        cors_origins=args.cors_origin,
        trust_local=not args.no_local_trust,
    )
