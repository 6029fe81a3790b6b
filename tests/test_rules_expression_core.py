"""One expression core (localbase.rules_expr) behind both rules engines.

Where the database and Storage languages overlap, the same text must parse to the same tree and
evaluate to the same value; where production differs, the difference is a named dialect hook, and
the tests below pin each one. Syntax errors in either rules file say where they are.
"""

from __future__ import annotations

import pytest

from localbase.rtdb.rules import RTDB, RtdbEvaluator, load_rules
from localbase.rules_expr import RuleSyntaxError, parse
from localbase.storage_rules import STORAGE, StorageEvaluator, StorageRules

AUTH = {"uid": "u", "token": {"sub": "u", "role": "dermatologist"}}


def rtdb_value(expr: str, **scope):
    return RtdbEvaluator(scope).evaluate(parse(expr, RTDB))


def storage_value(expr: str, **scope):
    return StorageEvaluator(scope, {}).evaluate(parse(expr, STORAGE))


def rtdb_holds(expr: str, **scope) -> bool:
    return RtdbEvaluator(scope).check(parse(expr, RTDB))


def storage_holds(expr: str, **scope) -> bool:
    return StorageEvaluator(scope, {}).check(parse(expr, STORAGE))


SHARED = [
    # precedence and associativity
    ("1 + 2 * 3", 7),
    ("(1 + 2) * 3", 9),
    ("10 - 4 - 3", 3),
    ("2 * 3 % 4", 2),
    ("-2 * -3", 6),
    ("!true || true", True),
    ("false && true || true", True),
    ("true || false && false", True),
    ("1 < 2 && 'a' < 'b'", True),
    ("false ? 1 : true ? 2 : 3", 2),
    # strict equality: no coercion between kinds
    ("1 == 1.0", True),
    ("1 == '1'", False),
    ("1 == true", False),
    ("null == null", True),
    ("[1, 'a'] == [1, 'a']", True),
    # strings
    ("'ab' + 'cd'", "abcd"),
    ("'Image/PNG'.lower()", "image/png"),
    ("'  x '.trim().size()", 1),
    ("'image/png'.matches('image/.*')", True),
    ("'x-image/png'.matches('image/.*')", False),  # a string pattern must match the whole value
    ("'IMAGE/JPG'.lower().matches('image/(png|jpe?g)')", True),
    # lists and maps
    ("[1, 'a', true].size()", 3),
    ("['a', 'b'].hasAny(['b', 'c'])", True),
    ("['a', 'b'].hasAll(['a', 'c'])", False),
    ("auth.token.role", "dermatologist"),
    ("auth['uid'] + '!'", "u!"),
]


@pytest.mark.parametrize("expr,expected", SHARED)
def test_overlap_parses_to_one_tree_and_one_value(expr, expected):
    assert parse(expr, RTDB) == parse(expr, STORAGE)
    assert rtdb_value(expr, auth=AUTH) == expected
    assert storage_value(expr, auth=AUTH) == expected


@pytest.mark.parametrize("expr,expected", [
    ("auth != null && auth.uid == 'u'", False),  # the right side would be an error
    ("auth == null || auth.uid == 'u'", True),
    ("auth == null ? true : auth.uid == 'u'", True),  # only the chosen branch is evaluated
    ("auth.uid == 'u'", False),  # member of null: an error, and errors deny
    ("1 < 'a'", False),
    ("'a' - 1 == 0", False),
    ("1 / 0 == 0", False),
    ("!1", False),
    ("nobody == 1", False),
    ("1", False),  # only exactly true grants
])
def test_short_circuit_and_errors_deny_in_both(expr, expected):
    assert rtdb_holds(expr, auth=None) is expected
    assert storage_holds(expr, auth=None) is expected


def test_where_production_differs_is_a_dialect_hook():
    # Storage integers divide to integers; JavaScript numbers do not.
    assert rtdb_value("7 / 2") == 3.5 and storage_value("7 / 2") == 3
    assert rtdb_value("-7 / 2") == -3.5 and storage_value("-7 / 2") == -3
    # A missing child or claim is null in the database, an error in Storage.
    assert rtdb_holds("auth.token.admin == null", auth=AUTH)
    assert not storage_holds("auth.token.admin == null", auth=AUTH)
    # Storage forgives an error on one side of || when the other side decides.
    assert not rtdb_holds("auth.uid == 'u' || true", auth=None)
    assert storage_holds("auth.uid == 'u' || true", auth=None)
    # JavaScript ranks equality below ordering; Storage has one relational level, left to right.
    assert rtdb_holds("true == 1 < 2")
    assert not storage_holds("true == 1 < 2")  # (true == 1) < 2 compares a bool: an error
    # Each language has only its own methods.
    assert rtdb_holds("'abc'.contains('b')") and not storage_holds("'abc'.contains('b')")
    assert storage_holds("m.keys() == ['k']", m={"k": 1})
    assert not rtdb_holds("m.keys() == ['k']", m={"k": 1})


@pytest.mark.parametrize("expr,only_in", [
    ("1 === 1", RTDB),
    ("$uid == 'u'", RTDB),
    ("'abc'.matches(/^a/)", RTDB),
    ("1e3 == 1000", RTDB),
    ("'a' in ['a']", STORAGE),
    ("[1, 2,].size() == 2", STORAGE),
    ("1 /* a comment */ == 1", STORAGE),
])
def test_syntax_that_only_one_language_has(expr, only_in):
    other = STORAGE if only_in is RTDB else RTDB
    parse(expr, only_in)
    with pytest.raises(RuleSyntaxError):
        parse(expr, other)


@pytest.mark.parametrize("dialect", [RTDB, STORAGE], ids=["rtdb", "storage"])
def test_expression_syntax_errors_carry_their_position(dialect):
    with pytest.raises(RuleSyntaxError) as info:
        parse("auth != null &&", dialect)
    assert (info.value.line, info.value.column) == (1, 16)
    assert "expected an expression, got end of input at line 1, column 16" in str(info.value)
    with pytest.raises(RuleSyntaxError) as info:
        parse("(1 + 2", dialect)
    assert "expected ')'" in str(info.value) and "column 7" in str(info.value)
    with pytest.raises(RuleSyntaxError) as info:
        parse("1 + 2)", dialect)
    assert "unexpected ')' at line 1, column 6" in str(info.value)


def test_database_rules_file_error_names_the_rule_and_its_line():
    text = """{
  // a comment with "quotes" does not shift the lines
  "rules": {
    "users": { "$uid": { ".read": "auth != null && auth.uid ==" } }
  }
}"""
    with pytest.raises(RuleSyntaxError) as info:
        load_rules(text)
    message = str(info.value)
    assert message.startswith("rules/users/$uid/.read: expected an expression, got end of input")
    column = text.splitlines()[3].index("auth.uid ==") + len("auth.uid ==") + 1
    assert f"line 4, column {column}" in message
    assert "'auth != null && auth.uid =='" in message


def test_database_rules_json_error_keeps_file_lines_despite_comments():
    text = '{\n  /* one\n  two */\n  "rules": {\n    ".read": true,\n  }\n}'
    with pytest.raises(RuleSyntaxError) as info:
        load_rules(text)
    assert "line 6" in str(info.value)


def test_storage_rules_file_error_names_its_line_and_column():
    source = """rules_version = '2';
service firebase.storage {
  match /b/{bucket}/o {
    match /x/{file} {
      allow read: if request.auth != null && ;
    }
  }
}"""
    with pytest.raises(RuleSyntaxError) as info:
        StorageRules(source)
    column = source.splitlines()[4].index(";") + 1
    assert str(info.value) == f"storage.rules: expected an expression, got ';' at line 5, column {column}"
    assert (info.value.line, info.value.column) == (5, column)
