"""The RTDB store on its own: what is staged in memory is exactly what a reload from SQLite gives
back, and a failing commit is reported to every waiting writer (never silently dropped)."""

from __future__ import annotations

import asyncio
import sqlite3

import pytest

from localbase.rtdb.store import Committer, Store


def write(store: Store, ns_name: str, ops, priorities=None) -> None:
    ns = store.namespace(ns_name)
    store.commit_now(store.stage(ns, ops, priorities))


def test_staged_tree_equals_reloaded_tree(tmp_path):
    store = Store(tmp_path / "db.sqlite3")
    write(store, "a", [((), {"x": {"y": 1, "z": {"0": 1, "1": 2}}, "leaf": 5})])  # stored form (normalised)
    write(store, "a", [(("leaf", "now"), "object")])             # primitive replaced by an object
    write(store, "a", [(("x", "y"), None), (("x", "w"), True)])   # multi-path
    write(store, "a", [(("p",), "v")], {("p",): 3})                # priority
    write(store, "a", [(("gone", "only"), 1)], {("gone",): 1})
    write(store, "a", [(("gone", "only"), None)])                  # prunes /gone and its priority
    write(store, "b", [(("other",), 1)])
    expected = {name: (ns.root, dict(ns.priorities)) for name, ns in store.namespaces.items()}
    assert expected["a"] == ({"x": {"z": {"0": 1, "1": 2}, "w": True}, "leaf": {"now": "object"}, "p": "v"},
                             {("p",): 3})
    store.close()
    reopened = Store(tmp_path / "db.sqlite3")
    assert {name: (ns.root, dict(ns.priorities)) for name, ns in reopened.namespaces.items()} == expected
    reopened.close()


def test_writes_submitted_together_commit_in_order(tmp_path):
    store = Store(tmp_path / "db.sqlite3")

    async def scenario():
        committer = Committer(store, asyncio.get_running_loop(), lambda exc: None)
        ns = store.namespace("a")
        delivered: list[int] = []
        # Submitted in one loop step: the first commits inline, the rest go to the writer thread.
        futures = [committer.submit(store.stage(ns, [(("n",), i)]), lambda i=i: delivered.append(i)) for i in range(50)]
        await asyncio.gather(*futures)
        await asyncio.get_running_loop().run_in_executor(None, committer.close)
        return delivered

    assert asyncio.run(scenario()) == list(range(50))
    store.close()
    assert Store(tmp_path / "db.sqlite3").namespace("a").root == {"n": 49}


def test_a_failed_commit_fails_its_writers_and_every_later_one(tmp_path):
    store = Store(tmp_path / "db.sqlite3")
    failures: list[BaseException] = []

    def broken_commit(statements):
        raise sqlite3.OperationalError("disk I/O error")

    async def scenario():
        committer = Committer(store, asyncio.get_running_loop(), failures.append)
        ns = store.namespace("a")
        delivered = []
        ok = committer.submit(store.stage(ns, [(("k",), 1)]), lambda: delivered.append("k"))
        await ok
        store.commit_now = broken_commit
        bad = committer.submit(store.stage(ns, [(("k",), 2)]), lambda: delivered.append("bad"))
        with pytest.raises(sqlite3.OperationalError):
            await bad
        later = committer.submit([], lambda: delivered.append("later"))
        with pytest.raises(sqlite3.OperationalError):
            await later
        await asyncio.get_running_loop().run_in_executor(None, committer.close)
        return delivered, committer.failure

    delivered, failure = asyncio.run(scenario())
    assert delivered == ["k"]  # events of failed writes are never delivered
    assert isinstance(failure, sqlite3.OperationalError) and failures
    del store.commit_now
    store.reload()
    assert store.namespace("a").root == {"k": 1}  # back to what is on disk
    store.close()


def test_every_staged_statement_finds_its_rows_by_key(tmp_path):
    """A write must touch only the rows it changes: every statement a write stages searches the
    primary key by path (an ``OR`` of the node and its subtree made SQLite scan the whole namespace,
    so each write cost time proportional to the data already stored)."""
    store = Store(tmp_path / "db.sqlite3")
    write(store, "a", [((), {"x": {"y": 1}, "p": 2})], {("p",): 1})
    ns = store.namespace("a")
    statements = store.stage(ns, [(("x", "y"), {"deep": 1}), (("p",), None)], {("x",): 2})
    statements += store.stage(ns, [(("x", "y", "deep"), 5)])
    for sql, params, many in statements:
        if many or not sql.startswith("DELETE"):
            continue
        plan = " ".join(str(row[-1]) for row in store.conn.execute("EXPLAIN QUERY PLAN " + sql, params))
        assert "path" in plan, (sql, plan)  # e.g. "SEARCH leaves USING PRIMARY KEY (ns=? AND path>? AND path<?)"
    store.close()
