"""Benchmark what localbase's secure mode costs and what it withstands, beside emulator mode.

Starts real localbase processes (project rules) on free ports in a temporary directory and measures,
in one run:

* the token check itself, in-process (median microseconds per token over 2,000 tokens): the
  emulator's unsigned decode, RS256 verification with PyJWT (new token / token seen before) and, as
  the floor, one bare RSA-2048 signature verification with cryptography;
* database writes/s: end users PATCHing their display name under the rules (16 concurrent aiohttp
  clients), in emulator mode (unsigned tokens) and in secure mode (RS256 tokens: one per client, so
  the server's verified-signature cache is hit, and a new token on every write, so every write pays
  a signature check), plus admin PUTs (``owner`` from this machine) in both modes. The modes
  alternate for ``--rounds`` rounds; the table gives the median, and localbase's CPU per write;
* slow connections: a localbase whose open-file limit is 1,024 (``ulimit -n 1024``, set in the child
  with setrlimit) is sent more and more connections that each send half a request head and then
  nothing (slowloris), from many client addresses (127.0.0.x, 50 each) or from one; after each step a
  normal request (a small database read) must be answered within 1 s. Emulator mode (no limits) vs
  secure mode (per-client cap, process-wide cap from the open-file limit with eviction of idle
  connections, 10 s request-head timeout). Reported, not asserted.

Usage: ``python bench/bench_security.py [--writes N] [--clients C] [--rounds R] [--slow 100,500,...]
[--only writes|slow]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import aiohttp
import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from localbase.tokens import SigningKey, decode_id_token, mint_id_token  # noqa: E402
from tests.localbase_process import LocalbaseProcess  # noqa: E402

OWNER = {"Authorization": "Bearer owner"}


def server_cpu_s(pid: int) -> float:
    """User + system CPU seconds of the localbase process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _writers(n: int, clients: int, make_request) -> tuple[float, int]:
    """(writes/s, requests sent) for ``n`` writes from ``clients`` concurrent clients."""
    per_client = n // clients
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients)) as session:
        async def client(c: int, count: int, offset: int) -> None:
            for i in range(count):
                method, url, params, body, headers = make_request(c, offset + i)
                async with session.request(method, url, params=params, data=body, headers=headers) as r:
                    if r.status not in (200, 204):
                        raise RuntimeError(f"{r.status}: {await r.text()}")

        await asyncio.gather(*(client(c, 2, 0) for c in range(clients)))  # warm up connections
        start = time.perf_counter()
        await asyncio.gather(*(client(c, per_client, 2) for c in range(clients)))
        return per_client * clients / (time.perf_counter() - start), per_client * clients + 2 * clients


def user_writes(lb: LocalbaseProcess, n: int, clients: int, fresh_tokens: bool) -> tuple[float, float]:
    """(writes/s, server CPU us per write) of end users writing their own display name."""
    project, ns = lb.project_id, lb.settings().database_namespace
    signer = lb.signing_key() if lb.secure else None
    uids = [f"bench-{uuid.uuid4().hex[:8]}-{c}" for c in range(clients)]
    per_client = n // clients + 2
    if fresh_tokens:  # minted before timing: the client's signing cost is not the server's
        tokens = [[mint_id_token(project, uids[c], {"n": i}, signer=signer) for i in range(per_client)]
                  for c in range(clients)]
    else:
        tokens = [[mint_id_token(project, uids[c], signer=signer)] for c in range(clients)]

    def make(c: int, i: int):
        token = tokens[c][i % len(tokens[c])]
        return ("PATCH", f"{lb.database_url}/users/{uids[c]}.json", {"ns": ns, "auth": token, "print": "silent"},
                json.dumps({"displayName": f"user {i}"}), None)

    before = server_cpu_s(lb.proc.pid)
    rate, sent = asyncio.run(_writers(n, clients, make))
    return rate, (server_cpu_s(lb.proc.pid) - before) / sent * 1e6


def admin_writes(lb: LocalbaseProcess, n: int, clients: int) -> tuple[float, float]:
    ns, run = lb.settings().database_namespace, uuid.uuid4().hex

    def make(c: int, i: int):
        return ("PUT", f"{lb.database_url}/bench/{run}/c{c}/k{i % 200}.json", {"ns": ns, "print": "silent"},
                json.dumps({"n": i}), OWNER)

    before = server_cpu_s(lb.proc.pid)
    rate, sent = asyncio.run(_writers(n, clients, make))
    return rate, (server_cpu_s(lb.proc.pid) - before) / sent * 1e6


# ---- slow connections ---------------------------------------------------------------------------

HEAD = b"GET /bench/ping.json HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "


def open_slow(port: int, source: str) -> socket.socket | None:
    sock = socket.socket()
    try:
        sock.bind((source, 0))
        sock.settimeout(0.5)
        sock.connect(("127.0.0.1", port))
        sock.sendall(HEAD)
        sock.setblocking(False)
        return sock
    except OSError:
        sock.close()
        return None


def still_open(sock: socket.socket) -> bool:
    try:
        return sock.recv(1, socket.MSG_PEEK) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False


def normal_request(url: str, headers: dict[str, str]) -> float | None:
    """Milliseconds to a 200 answer, or None if none came within 1 s."""
    start = time.perf_counter()
    try:
        r = requests.get(url, headers=headers, timeout=1.0)
    except requests.RequestException:
        return None
    return (time.perf_counter() - start) * 1000 if r.status_code == 200 else None


def slow_connections(lb: LocalbaseProcess, steps: list[int], per_address: int | None,
                     headers: dict[str, str]) -> list[tuple[int, int, str]]:
    """[(connections attempted, still open, normal request result)] after each step."""
    port = lb.ports["database"]
    ns = lb.settings().database_namespace
    url = f"{lb.database_url}/bench/ping.json?ns={ns}"
    requests.put(url, headers=headers, data="1", timeout=30).raise_for_status()
    held: list[socket.socket] = []
    attempted = 0
    rows = []
    try:
        for target in steps:
            failures = 0
            while attempted < target:
                address = 2 + (attempted // per_address if per_address else 0)
                sock = open_slow(port, f"127.0.{address >> 8}.{address & 255}")
                attempted += 1
                if sock is not None:
                    held.append(sock)
                    failures = 0
                else:
                    failures += 1
                    if failures >= 20:  # the server no longer accepts: the rest of the step would fail too
                        attempted = target
            time.sleep(0.2)
            alive = sum(still_open(s) for s in held)
            latency = normal_request(url, headers)
            rows.append((target, alive, "failed (no answer within 1 s)" if latency is None else f"ok, {latency:.0f} ms"))
    finally:
        for sock in held:
            sock.close()
    return rows


def token_checks(tmp: Path, n: int = 2000) -> None:
    """Per-token cost of the check each end-user request pays, measured in this process."""
    import base64

    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding

    key = SigningKey.load_or_create(tmp / "token-bench")
    signed = [mint_id_token("bench", f"u{i}", {"n": i}, signer=key) for i in range(n)]
    unsigned = [mint_id_token("bench", f"u{i}", {"n": i}) for i in range(n)]

    def per_token(fn, items) -> float:
        start = time.perf_counter()
        for item in items:
            fn(item)
        return (time.perf_counter() - start) / len(items) * 1e6

    head, body, sig = signed[0].split(".")
    signature = base64.urlsafe_b64decode(sig + "=" * (-len(sig) % 4))
    message = f"{head}.{body}".encode()
    rows = [
        ("baseline: one RSA-2048 PKCS#1 v1.5 verification (cryptography)",
         per_token(lambda _: key.public_key.verify(signature, message, padding.PKCS1v15(), hashes.SHA256()),
                   range(n))),
        ("emulator mode: unsigned token, claims checked", per_token(lambda t: decode_id_token(t, "bench"), unsigned)),
        ("secure mode: RS256 token seen for the first time (PyJWT)",
         per_token(lambda t: key.decode_id_token(t, "bench"), signed)),
        ("secure mode: RS256 token seen before (verified-signature cache)",
         per_token(lambda t: key.decode_id_token(t, "bench"), signed)),
    ]
    print("\nToken check per request, in-process:\n")
    print("| check | us per token |")
    print("|---|---:|")
    for label, cost in rows:
        print(f"| {label} | {cost:,.1f} |", flush=True)


def writes(args: argparse.Namespace, tmp: Path) -> None:
    """The write rows: both modes on their own process, alternating, median of the rounds."""
    emulator = LocalbaseProcess(data_dir=tmp / "emulator").start()
    secure = LocalbaseProcess(data_dir=tmp / "secure", secure=True).start()
    results: dict[str, list[tuple[float, float]]] = {}
    try:
        for _ in range(args.rounds):
            for label, fn in (
                ("end users under rules, emulator mode (unsigned tokens)",
                 lambda: user_writes(emulator, args.writes, args.clients, False)),
                ("end users under rules, secure mode (RS256, one token per client)",
                 lambda: user_writes(secure, args.writes, args.clients, False)),
                ("end users under rules, secure mode (RS256, a new token on every write)",
                 lambda: user_writes(secure, args.writes, args.clients, True)),
                ("admin PUT, emulator mode (`owner`)", lambda: admin_writes(emulator, args.writes, args.clients)),
                ("admin PUT, secure mode (`owner` from this machine)",
                 lambda: admin_writes(secure, args.writes, args.clients)),
            ):
                results.setdefault(label, []).append(fn())
    finally:
        emulator.stop()
        secure.stop()
    print(f"\nDatabase writes ({args.writes} per row and round, {args.clients} concurrent clients, "
          f"median of {args.rounds} alternating rounds):\n")
    print("| writes | writes/s | localbase CPU per write |")
    print("|---|---:|---:|")
    for label, values in results.items():
        rate = statistics.median(v[0] for v in values)
        cpu = statistics.median(v[1] for v in values)
        print(f"| {label} | {rate:,.0f} | {cpu:,.0f} us |", flush=True)


def slow(args: argparse.Namespace, tmp: Path, steps: list[int]) -> None:
    """The slow-connection rows: a fresh 1,024-descriptor localbase per scenario."""
    print(f"\nSlow connections against a localbase with `ulimit -n 1024` (steps {args.slow}):\n")
    print("| mode | slow connections from | attempted | still held by the server | normal request (1 s budget) |")
    print("|---|---|---:|---:|---|")
    scenarios = [
        ("emulator", [], 50, "50 per address (127.0.0.x)"),
        ("secure", ["--no-local-trust"], 50, "50 per address (127.0.0.x)"),
        ("secure", ["--no-local-trust"], None, "one address"),
    ]
    for mode, extra, per_address, label in scenarios:
        lb = LocalbaseProcess(data_dir=tmp / f"slow-{mode}-{per_address}", secure=mode == "secure",
                              extra_args=extra, nofile=1024).start()
        try:
            headers = {"Authorization": f"Bearer {lb.admin_credential}"} if mode == "secure" else OWNER
            for attempted, alive, outcome in slow_connections(lb, steps, per_address, headers):
                print(f"| {mode} | {label} | {attempted:,} | {alive:,} | {outcome} |", flush=True)
        finally:
            lb.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--writes", type=int, default=4000, help="writes per throughput measurement")
    parser.add_argument("--clients", type=int, default=16, help="concurrent REST clients")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds per mode (median reported)")
    parser.add_argument("--slow", default="250,500,750,900,1000,1100,2000,4000,8000",
                        help="cumulative numbers of slow connections to hold")
    parser.add_argument("--only", choices=("writes", "slow"), default=None, help="run one of the two parts")
    args = parser.parse_args()
    steps = [int(s) for s in args.slow.split(",")]

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        print(f"load average before the run: {os.getloadavg()[0]:.1f} ({os.cpu_count()} cores)", flush=True)
        if args.only != "slow":
            token_checks(tmp)
            writes(args, tmp)
        if args.only != "writes":
            slow(args, tmp, steps)
        print(f"\nload average after the run: {os.getloadavg()[0]:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
