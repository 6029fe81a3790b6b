"""The rules expression language and the RTDB rules semantics, evaluated directly (no server)."""

from __future__ import annotations

import pytest

from localbase.rtdb.rules import Rules, Snapshot, check_expression, load_rules, parse_expression
from localbase.rtdb.values import get_at
from localbase.rules_expr import RuleSyntaxError


def holds(expr: str, **scope) -> bool:
    return check_expression(parse_expression(expr), scope)


@pytest.mark.parametrize("expr", [
    "1 + 2 * 3 === 7",
    "(1 + 2) * 3 == 9",
    "10 % 4 == 2 && 7 / 2 == 3.5",
    "-3 < -2",
    "!false",
    "'ab' + 'cd' == 'abcd'",
    "'Hello'.toLowerCase() == 'hello' && 'x'.toUpperCase() == 'X'",
    "'hello'.length == 5",
    "'hello'.contains('ell') && 'hello'.beginsWith('he') && 'hello'.endsWith('lo')",
    "'a-b-c'.replace('-', '+') == 'a+b+c'",
    "'abc123'.matches(/^[a-z]+[0-9]{3}$/)",
    "'ABC'.matches(/^abc$/i)",
    "true ? 1 == 1 : false",
    "null == null",
    "'a' < 'b' && 2 >= 2",
])
def test_true_expressions(expr):
    assert holds(expr)


@pytest.mark.parametrize("expr", [
    "1 == '1'",             # no coercion
    "1 < 'a'",              # ordered comparison of different types: error -> false
    "'a' - 1 == 0",         # arithmetic on a string: error
    "auth.uid == 'x'",      # member of null: error
    "unknown == 1",         # unknown variable: error
    "1",                    # not a boolean: deny
    "'abc'.nope()",         # unknown method
    "1 / 0 == 1",
    "!1",
])
def test_false_or_error_expressions(expr):
    assert not holds(expr, auth=None)


def test_short_circuit_guards_null_auth():
    assert not holds("auth != null && auth.uid == 'x'", auth=None)
    assert holds("auth == null || auth.uid == 'x'", auth=None)
    assert holds("auth.token.role === 'dermatologist'", auth={"uid": "d", "token": {"role": "dermatologist"}})
    assert not holds("auth.token.role === 'dermatologist'", auth={"uid": "p", "token": {}})


@pytest.mark.parametrize("source", ["auth ===", "(1", "a b", "'unterminated", "x.matches(/[/)"])
def test_syntax_errors_are_reported(source):
    with pytest.raises(RuleSyntaxError):
        parse_expression(source)


def test_snapshot_methods():
    tree = {"a": {"b": 1, "s": "txt", "t": True, "o": {"x": 1}}}
    snap = Snapshot(lambda p: get_at(tree, p), ("a",))
    scope = {"data": snap}
    assert holds("data.child('b').val() == 1 && data.child('b').isNumber()", **scope)
    assert holds("data.child('s').isString() && data.child('t').isBoolean()", **scope)
    assert holds("data.hasChild('o/x') && !data.hasChild('nope')", **scope)
    assert holds("data.hasChildren() && data.hasChildren(['b', 's']) && !data.hasChildren(['b', 'zz'])", **scope)
    assert holds("data.child('o').parent().child('b').val() == 1", **scope)
    assert holds("!data.child('missing').exists() && data.child('missing').child('deeper').val() == null", **scope)
    assert not holds("data.parent().parent().exists()", **scope)  # parent() of the root is an error


RULES = """{
  // comments are allowed, as in the files firebase deploys
  "rules": {
    "open": { ".read": true, ".write": "auth != null" },
    "nested": {
      ".read": "auth != null",
      "secret": { ".read": false }
    },
    "items": {
      "$id": {
        ".write": "auth != null && auth.uid === $id",
        ".validate": "newData.hasChildren(['n'])",
        "n": { ".validate": "newData.isNumber() && newData.val() > data.val()" },
        "$other": { ".validate": false }
      }
    },
    "pair": {
      ".write": true,
      "a": { ".validate": "newData.val() === newData.parent().child('b').val()" }
    }
  }
}"""


@pytest.fixture
def rules() -> Rules:
    return Rules(load_rules(RULES))


def test_reads_cascade_and_are_not_filters(rules):
    tree = {}
    old = lambda p: get_at(tree, p)  # noqa: E731
    user = {"uid": "u", "token": {}}
    assert rules.can_read(("open", "x", "y"), None, old)
    assert rules.can_read(("nested", "secret"), user, old)      # a grant above cannot be revoked below
    assert not rules.can_read(("nested",), None, old)
    assert not rules.can_read((), user, old)                    # reading the root: nothing grants it


def test_writes_validate_against_merged_new_data(rules):
    tree = {"items": {"u": {"n": 5}}}
    old = lambda p: get_at(tree, p)  # noqa: E731
    user = {"uid": "u", "token": {}}
    assert rules.can_write([(("items", "u"), {"n": 6})], user, old)
    assert not rules.can_write([(("items", "u"), {"n": 4})], user, old)          # n must grow
    assert not rules.can_write([(("items", "u"), {"n": 6, "x": 1})], user, old)  # $other: false
    assert not rules.can_write([(("items", "v"), {"n": 6})], user, old)          # not $id
    assert not rules.can_write([(("items", "u"), {"n": 6})], None, old)
    assert rules.can_write([(("items", "u"), None)], user, old)                   # deletes skip .validate
    # A multi-path update is checked against the merged result of all its paths.
    assert rules.can_write([(("pair", "a"), 1), (("pair", "b"), 1)], None, old)
    assert not rules.can_write([(("pair", "a"), 1), (("pair", "b"), 2)], None, old)


def test_bad_rules_files_are_refused():
    for text in ('{"rules": {".read": "auth =="}}', '{"rules": {".reed": true}}', '{"rulez": {}}',
                 '{"rules": {"$a": {}, "$b": {}}}', "not json"):
        with pytest.raises(RuleSyntaxError):
            load_rules(text)


def test_project_rules_file_loads():
    from dermaloop.settings import PROJECT_ROOT

    root = load_rules((PROJECT_ROOT / "database.rules.json").read_text())
    assert "score" in root.children["queue"].index_on
