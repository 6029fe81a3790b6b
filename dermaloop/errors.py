"""One exception family for the end-user clients of Auth, the Realtime Database and Storage.

An offline-first app reacts to *kinds* of failure, whichever service reported them: show "offline"
on :class:`Unavailable`, ask for the password again on :class:`Unauthenticated`, tell the user
"not allowed" on :class:`PermissionDenied`. Older code catches *services*
(``dermaloop.auth.AuthError``, ``dermaloop.database.DatabaseError``,
``dermaloop.storage.StorageError``). Both keep working because every error a client raises is an
instance of one kind **and** of its service's class: a refused RTDB read raises a class that
derives from :class:`PermissionDenied` and from ``DatabaseError`` (made by :func:`error_class`),
and all of them derive from :class:`ServiceError`.

:class:`Unauthenticated` derives from :class:`PermissionDenied`: the Realtime Database answers a
rules denial and a bad or expired token with the same HTTP 401, and code written before this module
caught both as ``PermissionDenied``. Catch ``Unauthenticated`` first when the two need different
handling.

No ``requests`` exception leaves the clients: :mod:`dermaloop.http` turns them into
:class:`Unavailable`, whose message names the service, its address and what to do.
"""

from __future__ import annotations

__all__ = [
    "Conflict",
    "InvalidArgument",
    "NotFound",
    "PermissionDenied",
    "ServiceError",
    "Unauthenticated",
    "Unavailable",
    "error_class",
]

README_HINT = "set the Firebase settings (see README)"


class ServiceError(Exception):
    """Root of every error the Auth, Realtime Database and Storage clients raise.

    ``message`` is the service's own text, ``status`` the HTTP status (None when no answer came),
    ``code`` a service error code where there is one (Auth's ``EMAIL_EXISTS`` ...), ``service`` one
    of "Auth", "Realtime Database", "Storage", and ``address`` the base URL that was called.
    """

    service: str = "Firebase"

    def __init__(self, text: str, *, message: str | None = None, status: int | None = None,
                 code: str | None = None, service: str | None = None, address: str | None = None) -> None:
        super().__init__(text)
        self.message = text if message is None else message
        self.status = status
        self.code = code
        self.address = address
        if service is not None:
            self.service = service


class InvalidArgument(ServiceError):
    """The service refused the request as malformed (HTTP 400: bad query, weak password, ...)."""


class PermissionDenied(ServiceError):
    """The security rules refused the read or write (RTDB 401 ``Permission denied``, Storage 403)."""


class Unauthenticated(PermissionDenied):
    """Who the caller is could not be established: wrong password, unknown account, or an ID or
    refresh token that is malformed, expired, revoked or belongs to a disabled user. The remedy is
    to sign in again (a :class:`~dermaloop.auth.UserSession` refreshes expired ID tokens itself)."""


class NotFound(ServiceError):
    """The object, upload session or namespace does not exist (HTTP 404 / 410)."""


class Conflict(ServiceError):
    """The request lost against the current state: an ETag precondition failed, the email exists."""


class Unavailable(ServiceError):
    """The service could not be reached or kept failing (connection refused, DNS, timeout, 5xx or
    429 after the retries). ``str()`` is one line naming the service, the address and what to do.
    ``reason`` is the short cause ("connection refused", "HTTP 503 after 4 attempts");
    ``retry_after`` the seconds the server asked to wait, if it did."""

    def __init__(self, text: str | None = None, *, service: str | None = None, address: str | None = None,
                 reason: str = "unreachable", hint: str | None = None, status: int | None = None,
                 retry_after: float | None = None, message: str | None = None, code: str | None = None) -> None:
        service = service or type(self).service
        self.reason = reason
        self.retry_after = retry_after
        if text is None:
            text = f"cannot reach {_display(service)} at {address or '?'} ({reason}): {hint or README_HINT}"
        super().__init__(text, message=message if message is not None else reason, status=status, code=code,
                         service=service, address=address)


_DISPLAY = {"Auth": "Firebase Auth", "Realtime Database": "the Realtime Database", "Storage": "Firebase Storage"}


def _display(service: str) -> str:
    return _DISPLAY.get(service, service)


_combined: dict[tuple[type, type], type] = {}


def error_class(service_class: type[ServiceError], kind: type[ServiceError] | None) -> type[ServiceError]:
    """The class to raise for ``kind`` reported by the service whose class is ``service_class``:
    a subclass of both (``DatabasePermissionDenied(PermissionDenied, DatabaseError)``), made once.
    ``kind=None`` (an error of no particular kind) is the service class itself."""
    if kind is None or issubclass(service_class, kind):
        return service_class
    key = (service_class, kind)
    cls = _combined.get(key)
    if cls is None:
        prefix = service_class.__name__.removesuffix("Error")
        name = f"{prefix}{kind.__name__}"
        cls = type(name, (kind, service_class), {"__module__": __name__, "__qualname__": name,
                                                 "__doc__": f"{kind.__name__} reported by {service_class.service}."})
        _combined[key] = cls
        globals()[name] = cls  # so tracebacks and pickle find it by name
    return cls

