"""Benchmark localbase's Realtime Database: small-write throughput and write -> event latency.

Starts a real localbase (project rules) on free ports in a temporary directory and measures, in one run:

* baselines: raw SQLite commits of one small row (same WAL/synchronous settings) and the HTTP
  round trip of a tiny GET, i.e. the floors the write path sits on;
* small writes through firebase-admin ``Reference.set`` (sequential, as the worker does);
* small writes from concurrent REST clients (aiohttp), as admin and as end users under rules;
* the latency from a write being sent to its ``put`` event reaching 1, 10 and 100 SSE listeners.

Usage: ``python bench/bench_rtdb.py [--writes N] [--clients C] [--events M]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import aiohttp
import requests

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dermaloop.admin_app import get_app  # noqa: E402
from localbase.tokens import mint_id_token  # noqa: E402
from tests.localbase_process import LocalbaseProcess  # noqa: E402

ADMIN = {"Authorization": "Bearer owner"}


def server_cpu_s(pid: int) -> float:
    """User + system CPU seconds of the localbase process (Linux /proc), to report cost per write
    independently of how busy the shared machine is."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measured(pid: int, fn, *args) -> tuple[float, float]:
    """(rate from fn, server CPU microseconds per operation)."""
    before = server_cpu_s(pid)
    rate, n_ops = fn(*args)
    return rate, (server_cpu_s(pid) - before) / n_ops * 1e6


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def bench_sqlite(n: int, tmp: Path) -> float:
    conn = sqlite3.connect(str(tmp / "baseline.sqlite3"), isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("CREATE TABLE t (k TEXT PRIMARY KEY, v TEXT) WITHOUT ROWID")
    start = time.perf_counter()
    for i in range(n):
        conn.execute("BEGIN")
        conn.execute("INSERT OR REPLACE INTO t VALUES (?, ?)", (f"k{i}", '{"n":1}'))
        conn.execute("COMMIT")
    elapsed = time.perf_counter() - start
    conn.close()
    return n / elapsed


_NOOP_SERVER = """
import asyncio, socket, sys
from aiohttp import web
async def handle(request):
    await request.read()
    return web.Response(status=204)
async def main():
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    print(runner.addresses[0][1], flush=True)
    await asyncio.Event().wait()
asyncio.run(main())
"""


def bench_noop_server(n: int, clients: int) -> tuple[float, float]:
    """Baseline: the same concurrent PUT load against an aiohttp app that stores nothing."""
    proc = subprocess.Popen([sys.executable, "-c", _NOOP_SERVER], stdout=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline())
        base = f"http://127.0.0.1:{port}"

        def make(c: int, i: int):
            return ("PUT", f"{base}/bench/c{c}/k{i}.json", {"print": "silent"}, json.dumps({"n": i}), ADMIN)

        before = server_cpu_s(proc.pid)
        rate, n_ops = asyncio.run(_rest_writers(base, "", n, clients, make))
        return rate, (server_cpu_s(proc.pid) - before) / n_ops * 1e6
    finally:
        proc.terminate()
        proc.wait()


def bench_http_get(base: str, ns: str, n: int) -> float:
    with requests.Session() as s:
        s.put(f"{base}/bench/ping.json", params={"ns": ns}, headers=ADMIN, data="1")
        start = time.perf_counter()
        for _ in range(n):
            s.get(f"{base}/bench/ping.json", params={"ns": ns}, headers=ADMIN)
        return n / (time.perf_counter() - start), n


def bench_admin_set(settings, n: int) -> float:
    from firebase_admin import db

    ref = db.reference(f"/bench/admin-{uuid.uuid4().hex}", app=get_app(settings, name="bench"))
    ref.child("warm").set(0)
    start = time.perf_counter()
    for i in range(n):
        ref.child(f"k{i % 500}").set({"n": i, "at": {".sv": "timestamp"}})
    return n / (time.perf_counter() - start), n


async def _rest_writers(base: str, ns: str, n: int, clients: int, make_request) -> float:
    per_client = n // clients
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients)) as session:
        async def client(c: int) -> None:
            for i in range(per_client):
                method, url, params, body, headers = make_request(c, i)
                async with session.request(method, url, params=params, data=body, headers=headers) as r:
                    if r.status not in (200, 204):
                        raise RuntimeError(f"{r.status}: {await r.text()}")

        await asyncio.gather(*(client(c) for c in range(min(clients, 2))))  # warm up connections
        start = time.perf_counter()
        await asyncio.gather(*(client(c) for c in range(clients)))
        return per_client * clients / (time.perf_counter() - start), per_client * (clients + min(clients, 2))


def bench_rest_admin(base: str, ns: str, n: int, clients: int) -> float:
    run = uuid.uuid4().hex

    def make(c: int, i: int):
        return ("PUT", f"{base}/bench/rest-{run}/c{c}/k{i % 200}.json", {"ns": ns, "print": "silent"},
                json.dumps({"n": i}), ADMIN)

    return asyncio.run(_rest_writers(base, ns, n, clients, make))


def bench_rest_users(base: str, ns: str, project_id: str, n: int, clients: int) -> float:
    """End users writing their display name under the project's rules (rules + validation on each)."""
    tokens = [mint_id_token(project_id, f"bench-user-{c}") for c in range(clients)]

    def make(c: int, i: int):
        return ("PATCH", f"{base}/users/bench-user-{c}.json", {"ns": ns, "auth": tokens[c], "print": "silent"},
                json.dumps({"displayName": f"user {i}"}), None)

    return asyncio.run(_rest_writers(base, ns, n, clients, make))


async def _latency(base: str, ns: str, listeners: int, events: int) -> list[float]:
    path = f"/bench/sse-{uuid.uuid4().hex}"
    arrivals: dict[int, list[float]] = {}
    sent: dict[int, float] = {}
    ready = 0
    all_ready = asyncio.Event()

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        async def listen() -> None:
            nonlocal ready
            async with session.get(f"{base}{path}.json", params={"ns": ns},
                                   headers={**ADMIN, "Accept": "text/event-stream"},
                                   timeout=aiohttp.ClientTimeout(total=None)) as resp:
                event = None
                async for raw in resp.content:
                    line = raw.decode().rstrip("\n")
                    if line.startswith("event: "):
                        event = line[7:]
                    elif line.startswith("data: ") and event == "put":
                        now = time.perf_counter()
                        payload = json.loads(line[6:])
                        if payload["path"] == "/":
                            ready += 1
                            if ready == listeners:
                                all_ready.set()
                            continue
                        seq = payload["data"]
                        arrivals.setdefault(seq, []).append(now)
                        if seq == events - 1:
                            return

        tasks = [asyncio.create_task(listen()) for _ in range(listeners)]
        await asyncio.wait_for(all_ready.wait(), 60)
        for seq in range(events):
            sent[seq] = time.perf_counter()
            async with session.put(f"{base}{path}/v.json", params={"ns": ns, "print": "silent"}, headers=ADMIN,
                                   data=json.dumps(seq)) as r:
                assert r.status == 204
            await asyncio.sleep(0.02)
        await asyncio.wait_for(asyncio.gather(*tasks), 120)
    latencies = [(t - sent[seq]) * 1000 for seq, times in arrivals.items() for t in times]
    assert len(latencies) == listeners * events, (len(latencies), listeners * events)
    return latencies


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--writes", type=int, default=4000, help="writes per throughput measurement")
    parser.add_argument("--clients", type=int, default=16, help="concurrent REST clients")
    parser.add_argument("--events", type=int, default=50, help="events per latency measurement")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        server = LocalbaseProcess(data_dir=tmp / "lb").start()
        try:
            settings = server.settings()
            base, ns = server.database_url, settings.database_namespace
            pid = server.proc.pid
            rows = []
            rows.append(("baseline: SQLite commit of one small row (WAL, synchronous=NORMAL), 1 thread",
                         f"{bench_sqlite(args.writes, tmp):,.0f} commits/s", ""))
            rate, cpu_us = bench_noop_server(args.writes, args.clients)
            rows.append((f"baseline: PUT to a no-op aiohttp app, {args.clients} concurrent clients (aiohttp)",
                         f"{rate:,.0f} req/s", f"{cpu_us:,.0f} us"))
            runs = [
                ("baseline: HTTP GET of a tiny value, 1 client (requests)", "req/s",
                 bench_http_get, (base, ns, args.writes // 2)),
                ("firebase-admin `Reference.set`, 1 thread, sequential", "writes/s",
                 bench_admin_set, (settings, args.writes // 2)),
                (f"REST PUT as admin, {args.clients} concurrent clients (aiohttp)", "writes/s",
                 bench_rest_admin, (base, ns, args.writes, args.clients)),
                (f"REST PATCH as end users under the project rules, {args.clients} concurrent clients", "writes/s",
                 bench_rest_users, (base, ns, settings.project_id, args.writes, args.clients)),
            ]
            for name, unit, fn, fn_args in runs:
                rate, cpu_us = measured(pid, fn, *fn_args)
                rows.append((name, f"{rate:,.0f} {unit}", f"{cpu_us:,.0f} us"))
            for listeners in (1, 10, 100):
                lat = asyncio.run(_latency(base, ns, listeners, args.events))
                rows.append((f"write -> `put` event latency, {listeners} SSE listener(s), {args.events} writes",
                             f"p50 {statistics.median(lat):.1f} ms, p95 {pct(lat, 0.95):.1f} ms", ""))
        finally:
            server.stop()
    print(f"load average during the run: {os.getloadavg()[0]:.1f} (2 cores, shared)")
    print("| measurement | result | localbase CPU per request |")
    print("|---|---|---|")
    for name, value, cpu in rows:
        print(f"| {name} | {value} | {cpu} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
