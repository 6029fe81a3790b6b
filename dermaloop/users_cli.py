"""``dermaloop users``: manage accounts and their role claim through firebase-admin.

The same commands work against localbase (``FIREBASE_AUTH_EMULATOR_HOST`` set) and against real
Firebase (a service account in ``GOOGLE_APPLICATION_CREDENTIALS``). A role change reaches a user's
ID token at their next sign-in or token refresh (within the hour).
"""

from __future__ import annotations

import argparse
import json
import sys

from dermaloop import auth


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    add = sub.add_parser("add", help="create an account with a role (or update it if the email exists)")
    add.add_argument("--email", required=True)
    add.add_argument("--password", required=True, help="at least 6 characters")
    add.add_argument("--role", required=True, choices=auth.ROLES)
    add.add_argument("--display-name", default=None)
    listing = sub.add_parser("list", help="list accounts with their role")
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    role = sub.add_parser("set-role", help="change the role of an existing account")
    role.add_argument("--email", required=True)
    role.add_argument("--role", required=True, choices=auth.ROLES)


def run(args: argparse.Namespace) -> int:
    from firebase_admin import auth as admin_auth
    from firebase_admin import exceptions

    try:
        if args.action == "add":
            user, created = auth.create_user(args.email, args.password, args.role, args.display_name)
            print(f"{'created' if created else 'updated'} {user.email} uid={user.uid} role={args.role}")
        elif args.action == "set-role":
            user = auth.get_user_by_email(args.email)
            auth.set_role(user.uid, args.role)
            print(f"{user.email} uid={user.uid} role={args.role} (effective at the user's next token refresh)")
        elif args.action == "list":
            for user in sorted(auth.list_users(), key=lambda u: (u.email or "", u.uid)):
                role = (user.custom_claims or {}).get("role", "-")
                if args.json:
                    print(json.dumps({"uid": user.uid, "email": user.email, "role": role,
                                      "displayName": user.display_name, "disabled": user.disabled}))
                else:
                    state = " (disabled)" if user.disabled else ""
                    print(f"{user.email or '-':<40} {role:<14} {user.uid}{state}")
        return 0
    except admin_auth.UserNotFoundError:
        print(f"dermaloop users: no account with email {getattr(args, 'email', '?')}", file=sys.stderr)
        return 1
    except (ValueError, exceptions.FirebaseError) as exc:
        from dermaloop.unreachable import explain

        line = explain(exc)
        print(f"dermaloop users: {line or exc}", file=sys.stderr)
        return 2 if line else 1
