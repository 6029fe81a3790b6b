"""The HTTP layer the three end-user clients share: retries with backoff, and error translation.

Mobile networks drop, servers restart, Google's front ends answer 503 or 429 now and then. A
request that is safe to repeat is therefore tried again (bounded attempts, exponential backoff with
jitter, or as long as the server's ``Retry-After`` says); a request that is not safe to repeat is
repeated only when it certainly never left this machine (the connection was refused, the name did
not resolve), or when the server said 429 (Too Many Requests: nothing was done). Whatever still
fails leaves as :class:`~dermaloop.errors.Unavailable` – never as a ``requests`` exception – with
one line saying which service, at which address, and what to do.

Tests and impatient apps pass their own :class:`RetryPolicy` to the clients (``retry=``).
"""

from __future__ import annotations

import email.utils
import random
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import requests
import urllib3.exceptions

from dermaloop.errors import README_HINT, ServiceError, Unavailable, error_class

TokenSource = str | Callable[[], str]

RETRY_STATUSES = frozenset({429, 500, 502, 503, 504})
LOCAL_HOSTS = frozenset({"127.0.0.1", "localhost", "::1", "0.0.0.0"})


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how patiently a request is repeated.

    ``attempts`` counts the first try (1 = never repeat). The n-th repeat waits a random time in
    ``[d/2, d]`` with ``d = min(max_delay, base_delay * 2**(n-1))`` – jitter, so that many clients
    cut off by the same outage do not all come back in the same instant – unless the server sent
    ``Retry-After``, which is honoured up to ``max_retry_after`` (a longer wait gives up at once:
    better to tell the app it is unavailable than to freeze it for an hour).
    """

    attempts: int = 4
    base_delay: float = 0.5
    max_delay: float = 16.0
    max_retry_after: float = 60.0
    statuses: frozenset[int] = field(default=RETRY_STATUSES)

    def delay(self, failures: int, retry_after: float | None = None) -> float:
        """Seconds to wait after the ``failures``-th failed attempt."""
        if retry_after is not None:
            return max(0.0, min(retry_after, self.max_retry_after))
        cap = min(self.max_delay, self.base_delay * 2 ** max(0, failures - 1))
        return random.uniform(cap / 2, cap)


DEFAULT_RETRY = RetryPolicy()
NO_RETRY = RetryPolicy(attempts=1)


def parse_retry_after(value: str | None) -> float | None:
    """``Retry-After`` as seconds from now (it may be a number of seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _chain(exc: BaseException):
    """The exception, what it wraps (urllib3 puts the cause in ``args`` and ``reason``) and its causes."""
    seen: set[int] = set()
    todo: list[Any] = [exc]
    while todo:
        item = todo.pop(0)
        if not isinstance(item, BaseException) or id(item) in seen:
            continue
        seen.add(id(item))
        yield item
        todo.extend([getattr(item, "reason", None), item.__cause__, item.__context__, *item.args])


def never_sent(exc: BaseException) -> bool:
    """True if the request certainly did not reach the server (no connection was made)."""
    if isinstance(exc, requests.ConnectTimeout):
        return True
    return any(isinstance(e, urllib3.exceptions.NewConnectionError | urllib3.exceptions.ConnectTimeoutError
                          | socket.gaierror | ConnectionRefusedError) for e in _chain(exc))


def transient(exc: BaseException) -> bool:
    """True for failures that may go away by themselves (network, timeouts, dropped streams);
    False for ones a retry cannot fix (a malformed URL, a TLS certificate problem)."""
    if isinstance(exc, requests.exceptions.SSLError | requests.exceptions.InvalidURL
                  | requests.exceptions.MissingSchema | requests.exceptions.InvalidSchema):
        return False
    return isinstance(exc, requests.ConnectionError | requests.Timeout | requests.exceptions.ChunkedEncodingError
                      | urllib3.exceptions.HTTPError | ConnectionError | TimeoutError)


def describe(exc: BaseException) -> str:
    """A few words for what went wrong on the wire ("connection refused", "timed out" ...)."""
    chain = list(_chain(exc))
    if any(isinstance(e, ConnectionRefusedError) for e in chain) or "Connection refused" in str(exc):
        return "connection refused"
    if any(isinstance(e, socket.gaierror | urllib3.exceptions.NameResolutionError) for e in chain):
        return "host name not resolved"
    if isinstance(exc, requests.ConnectTimeout):
        return "connection timed out"
    if any(isinstance(e, requests.Timeout | TimeoutError | socket.timeout | urllib3.exceptions.TimeoutError)
           for e in chain):
        return "timed out"
    if isinstance(exc, requests.exceptions.SSLError):
        return "TLS error"
    if isinstance(exc, requests.exceptions.InvalidURL | requests.exceptions.MissingSchema
                  | requests.exceptions.InvalidSchema):
        return "invalid address"
    if any(isinstance(e, ConnectionResetError | BrokenPipeError | urllib3.exceptions.ProtocolError
                      | requests.exceptions.ChunkedEncodingError) for e in chain):
        return "connection dropped"
    return type(exc).__name__


def is_local(address: str) -> bool:
    return (urlsplit(address).hostname or "") in LOCAL_HOSTS


class Endpoint:
    """One service as the clients call it: a ``requests`` session, a timeout, a retry policy, and the
    service's error class and address for the errors it raises."""

    def __init__(self, service_class: type[ServiceError], address: str, session: requests.Session,
                 timeout: float | tuple[float, float], retry: RetryPolicy | None = None,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.service_class = service_class
        self.address = address.rstrip("/")
        self.session = session
        self.timeout = timeout
        self.retry = retry or DEFAULT_RETRY
        self.sleep = sleep

    # errors ----------------------------------------------------------------------------------
    def unavailable(self, reason: str, *, attempts: int = 1, status: int | None = None,
                    retry_after: float | None = None, message: str | None = None,
                    server_failing: bool = False, hint: str | None = None) -> Unavailable:
        """The :class:`Unavailable` this service raises, with advice fitting the address."""
        if attempts > 1:
            reason = f"{reason} after {attempts} attempts"
        if hint is None and server_failing:
            hint = "the service is up but overloaded or failing; try again later"
        elif hint is None and is_local(self.address):
            hint = f"start it with 'dermaloop run', or {README_HINT}"
        elif hint is None:
            hint = f"check the network connection, or {README_HINT}"
        cls = error_class(self.service_class, Unavailable)
        return cls(service=self.service_class.service, address=self.address, reason=reason, hint=hint,
                   status=status, retry_after=retry_after, message=message)

    def translate(self, exc: BaseException, attempts: int = 1) -> Unavailable:
        """A ``requests``/socket exception as this service's :class:`Unavailable`."""
        return self.unavailable(describe(exc), attempts=attempts)

    def json(self, response: requests.Response) -> Any:
        """The body as JSON. Anything else in a success answer means something other than the
        service answered (a captive portal, a proxy's error page): :class:`Unavailable`."""
        try:
            return response.json()
        except ValueError as exc:
            raise self.unavailable(f"HTTP {response.status_code} answer that is not JSON", status=response.status_code,
                                   message=_body_text(response),
                                   hint="something else answered (a captive portal or proxy?); "
                                        f"check the network connection, or {README_HINT}") from exc

    # requests --------------------------------------------------------------------------------
    def request(self, method: str, url: str, *, idempotent: bool, retry: RetryPolicy | None = None,
                **kwargs: Any) -> requests.Response:
        """Send, repeating as :class:`RetryPolicy` allows; returns any response that is not a
        retryable status (the caller maps 4xx to errors), raises :class:`Unavailable` otherwise."""
        policy = retry or self.retry
        kwargs.setdefault("timeout", self.timeout)
        failures = 0
        while True:
            try:
                response = self.session.request(method, url, **kwargs)
            except requests.RequestException as exc:
                failures += 1
                repeat = transient(exc) and (idempotent or never_sent(exc)) and failures < policy.attempts
                if not repeat:
                    raise self.translate(exc, failures) from exc
                self.sleep(policy.delay(failures))
                continue
            if response.status_code not in policy.statuses:
                return response
            failures += 1
            retry_after = parse_retry_after(response.headers.get("Retry-After"))
            status = response.status_code
            # A 429 says the server did nothing, so even a non-idempotent request may be repeated.
            repeat = ((idempotent or status == 429) and failures < policy.attempts
                      and (retry_after is None or retry_after <= policy.max_retry_after))
            if not repeat:
                text = _body_text(response)
                response.close()
                reason = f"HTTP {status} {response.reason or ''}".strip()
                raise self.unavailable(reason, attempts=failures, status=status, retry_after=retry_after,
                                       message=text or reason, server_failing=True)
            response.close()
            self.sleep(policy.delay(failures, retry_after))


def _body_text(response: requests.Response) -> str:
    try:
        return response.text[:300]
    except requests.RequestException:
        return ""


# token sources -------------------------------------------------------------------------------


def current_token(source: TokenSource | None) -> str | None:
    """The token a source gives now (a :class:`~dermaloop.auth.UserSession` refreshes if due)."""
    if source is None:
        return None
    return source() if callable(source) else source


def renew_token(source: TokenSource | None) -> bool:
    """Ask a refreshable source (a UserSession or its bound ``id_token``) for a new ID token, e.g.
    after the server called the current one expired; False if the source cannot renew."""
    renew = getattr(source, "force_refresh", None) or getattr(getattr(source, "__self__", None), "force_refresh", None)
    if renew is None:
        return False
    renew()
    return True
