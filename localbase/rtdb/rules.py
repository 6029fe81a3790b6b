"""Realtime Database security rules (``database.rules.json``) as production applies them.

* A read at P is allowed if any ``.read`` on the chain root -> P is true (grants cascade down and
  cannot be revoked deeper; rules are not filters).
* A write at P is allowed if any ``.write`` on root -> P is true, evaluated with ``data`` (before)
  and ``newData`` (after, merged with the rest of the request).
* Every ``.validate`` on root -> P and on each node of the new data under P must be true, except
  where the new data is null. A multi-path PATCH checks each of its paths against the merged result.
* Evaluation errors deny. Admin callers skip rules entirely (the caller decides that).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from localbase.rtdb.values import Path, get_at
from localbase.rules_expr import (
    Dialect,
    Evaluator,
    Member,
    Method,
    Node,
    RuleError,
    RuleSyntaxError,
    Scope,
    line_column,
    names_used,
    parse,
)

Rule = bool | tuple | None  # True/False literal, a parsed expression, or absent

# database.rules.json strings are JavaScript: equality binds looser than ordering, ``===`` is ``==``,
# numbers may be 1., .5 or 1e3, ``$`` starts wildcard variables, and ``matches`` takes a regex literal.
RTDB = Dialect(
    name="database.rules.json",
    binary={"||": 1, "&&": 2, "==": 3, "!=": 3, "===": 3, "!==": 3,
            "<": 4, "<=": 4, ">": 4, ">=": 4, "+": 5, "-": 5, "*": 6, "/": 6, "%": 6},
    operators=("===", "!=="),
    identifier=r"[A-Za-z_$][A-Za-z0-9_$]*",
    number=r"\d+\.\d*(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?|\d+(?:[eE][+-]?\d+)?",
    regex_literals=True,
)


class RtdbEvaluator(Evaluator):
    """Database semantics on the shared core: a missing child or claim reads as null, strings and
    lists have ``length``, and the string methods are JavaScript's names (plus the Storage ones)."""

    methods = {
        "string": frozenset({"contains", "beginsWith", "endsWith", "replace", "toLowerCase", "toUpperCase",
                             "matches", "lower", "upper", "size", "trim", "split"}),
        "list": frozenset({"size", "hasAll", "hasAny"}),
    }

    def lookup(self, obj: Any, name: str) -> Any:
        return obj.get(name)

    def attribute(self, obj: Any, name: str) -> Any:
        if name == "length" and isinstance(obj, str | list | tuple):
            return len(obj)
        return self.builtin(obj, name)  # a method named without a call is a value (equal to nothing)


def parse_expression(source: str) -> Node:
    """One rule string compiled; raises RuleSyntaxError naming the column."""
    return parse(source, RTDB)


def check_expression(rule: Node, scope: Scope) -> bool:
    """Whether a compiled rule grants: exactly ``true``; errors and other values deny."""
    return RtdbEvaluator(scope).check(rule)


@dataclass
class RuleNode:
    children: dict[str, RuleNode] = field(default_factory=dict)
    wildcard: tuple[str, RuleNode] | None = None
    read: Rule = None
    write: Rule = None
    validate: Rule = None
    index_on: tuple[str, ...] = ()
    # Whether any .read on this node reads the database (then listeners must be re-checked on writes).
    read_uses_data: bool = False

    def child(self, key: str) -> tuple[RuleNode | None, str | None]:
        node = self.children.get(key)
        if node is not None:
            return node, None
        if self.wildcard is not None:
            return self.wildcard[1], self.wildcard[0]
        return None, None


_DATA_NAMES = {"data", "root", "newData"}


def blank_comments(text: str) -> str:
    """Blank out // and /* */ comments outside of strings (rules files allow them, JSON does not).

    Comments become spaces, not nothing, so offsets in the result are offsets in the file: JSON
    errors and rule syntax errors then point at the line the author sees."""
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        if text[i] == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            out.append(text[i : j + 1])
            i = j + 1
            continue
        if text.startswith("//", i):
            j = text.find("\n", i)
            end = n if j < 0 else j
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            end = n if j < 0 else j + 2
        else:
            out.append(text[i])
            i += 1
            continue
        out.append(re.sub(r"[^\n]", " ", text[i:end]))
        i = end
    return "".join(out)


def _file_position(text: str, value: str, pos: int) -> str | None:
    """Where character ``pos`` of the rule string ``value`` sits in the file, if the string is found."""
    start = text.find(json.dumps(value, ensure_ascii=False))
    if start < 0:
        return None
    line, column = line_column(text, start + len(json.dumps(value[:pos], ensure_ascii=False)) - 1)
    return f"line {line}, column {column}"


def _compile(value: Any, where: str, text: str) -> Rule:
    if isinstance(value, bool):
        return value
    if isinstance(value, str):
        try:
            return parse_expression(value)
        except RuleSyntaxError as exc:
            in_file = _file_position(text, value, exc.pos or 0)
            at = f"{in_file} (column {exc.column} of {value!r})" if in_file else f"column {exc.column} of {value!r}"
            raise RuleSyntaxError(f"{where}: {exc.message} at {at}") from None
    raise RuleSyntaxError(f"{where}: a rule must be a boolean or an expression string")


def _build(spec: Any, where: str, text: str) -> RuleNode:
    if not isinstance(spec, dict):
        raise RuleSyntaxError(f"{where}: expected an object")
    node = RuleNode()
    for key, value in spec.items():
        here = f"{where}/{key}"
        if key in (".read", ".write", ".validate"):
            setattr(node, key[1:], _compile(value, here, text))
        elif key == ".indexOn":
            names = [value] if isinstance(value, str) else value
            if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
                raise RuleSyntaxError(f"{here}: .indexOn must be a string or a list of strings")
            node.index_on = tuple(names)
        elif key.startswith("."):
            raise RuleSyntaxError(f"{here}: unknown rule type {key!r}")
        elif key.startswith("$"):
            if node.wildcard is not None:
                raise RuleSyntaxError(f"{where}: more than one $wildcard at one level")
            node.wildcard = (key, _build(value, here, text))
        else:
            node.children[key] = _build(value, here, text)
    if isinstance(node.read, tuple):
        node.read_uses_data = bool(names_used(node.read) & _DATA_NAMES)
    return node


def load_rules(text: str) -> RuleNode:
    """Parse a rules file (comments allowed); raises RuleSyntaxError with the offending path."""
    text = blank_comments(text)
    try:
        spec = json.loads(text)
    except ValueError as exc:
        raise RuleSyntaxError(f"database rules are not valid JSON: {exc}") from None
    if not isinstance(spec, dict) or set(spec) != {"rules"}:
        raise RuleSyntaxError('database rules must be an object with the single key "rules"')
    return _build(spec["rules"], "rules", text)


LOCKED = RuleNode(read=False, write=False)


class Snapshot(Member):
    """``data``/``newData``/``root`` in rules: a read-only view of one location of a tree."""

    __slots__ = ("_source", "_path", "_value", "_priorities")
    _UNSET = object()

    def __init__(self, source: Callable[[Path], Any], path: Path, value: Any = _UNSET, priorities=None):
        self._source = source
        self._path = path
        self._value = value
        self._priorities = priorities or {}

    @property
    def value(self) -> Any:
        if self._value is Snapshot._UNSET:
            self._value = self._source(self._path)
        return self._value

    def _child(self, rel: Any) -> Snapshot:
        if not isinstance(rel, str):
            raise RuleError("child() needs a string path")
        keys = tuple(k for k in rel.split("/") if k)
        return Snapshot(self._source, self._path + keys, get_at(self.value, keys), self._priorities)

    def _parent(self) -> Snapshot:
        if not self._path:
            raise RuleError("parent() of the root")
        return Snapshot(self._source, self._path[:-1], priorities=self._priorities)

    def _has_children(self, names: Any = None) -> bool:
        value = self.value
        if not isinstance(value, dict):
            return False
        if names is None:
            return True
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise RuleError("hasChildren() needs a list of strings")
        return all(get_at(value, tuple(k for k in n.split("/") if k)) is not None for n in names)

    def rule_member(self, name: str) -> Any:
        method = _SNAPSHOT_METHODS.get(name)
        if method is None:
            raise RuleError(f"snapshots have no member {name!r}")
        return Method(name, method.__get__(self))

    def _val(self) -> Any:
        return self.value

    def _has_child(self, rel: Any) -> bool:
        return self._child(rel).value is not None

    def _exists(self) -> bool:
        return self.value is not None

    def _get_priority(self) -> Any:
        return self._priorities.get(self._path)

    def _is_number(self) -> bool:
        v = self.value
        return isinstance(v, int | float) and not isinstance(v, bool)

    def _is_string(self) -> bool:
        return isinstance(self.value, str)

    def _is_boolean(self) -> bool:
        return isinstance(self.value, bool)


_SNAPSHOT_METHODS = {
    "val": Snapshot._val, "child": Snapshot._child, "parent": Snapshot._parent, "hasChild": Snapshot._has_child,
    "hasChildren": Snapshot._has_children, "exists": Snapshot._exists, "getPriority": Snapshot._get_priority,
    "isNumber": Snapshot._is_number, "isString": Snapshot._is_string, "isBoolean": Snapshot._is_boolean,
}


def overlay(old: Callable[[Path], Any], ops: list[tuple[Path, Any]]) -> Callable[[Path], Any]:
    """The tree as it would be after ``ops``, computed per location on demand without copying it
    (only the dicts between a location and a written path are copied)."""
    cache: dict[Path, Any] = {}

    def replaced(node: Any, rel: Path, value: Any) -> Any:
        if not rel:
            return value
        base = dict(node) if isinstance(node, dict) else {}
        child = replaced(base.get(rel[0]), rel[1:], value)
        if child is None:
            base.pop(rel[0], None)
        else:
            base[rel[0]] = child
        return base or None

    def get(path: Path) -> Any:
        if path in cache:
            return cache[path]
        value = old(path)
        n = len(path)
        for w, v in ops:
            if w[:n] == path:
                value = replaced(value, w[n:], v)
            elif path[: len(w)] == w:
                value = get_at(v, path[len(w):])
        cache[path] = value
        return value

    return get


def auth_variable(claims: dict[str, Any] | None) -> dict[str, Any] | None:
    """The ``auth`` rules variable for verified ID-token claims."""
    if claims is None:
        return None
    firebase = claims.get("firebase") if isinstance(claims.get("firebase"), dict) else {}
    return {"uid": claims.get("sub"), "provider": firebase.get("sign_in_provider", "custom"), "token": claims}


class Rules:
    def __init__(self, root: RuleNode):
        self.root = root

    def _scope(self, auth, variables, extra) -> dict[str, Any]:
        scope = {"auth": auth, "now": int(time.time() * 1000)}
        scope.update(variables)
        scope.update(extra)
        return scope

    @staticmethod
    def _holds(rule: Rule, scope_fn: Callable[[], dict]) -> bool:
        if rule is None or rule is False:
            return False
        if rule is True:
            return True
        return check_expression(rule, scope_fn())

    def can_read(self, path: Path, auth: Any, old: Callable[[Path], Any], query: dict | None = None) -> bool:
        node: RuleNode | None = self.root
        variables: dict[str, str] = {}
        root_snap = Snapshot(old, ())
        for depth in range(len(path) + 1):
            if node is None:
                return False
            here = path[:depth]
            if self._holds(node.read, lambda here=here, variables=variables: self._scope(
                    auth, variables, {"root": root_snap, "data": Snapshot(old, here), "query": query})):
                return True
            if depth == len(path):
                return False
            node, var = node.child(path[depth])
            if var:
                variables = {**variables, var: path[depth]}
        return False

    def read_uses_data(self, path: Path) -> bool:
        """Whether a read decision at ``path`` can change when data changes (listeners re-check)."""
        node: RuleNode | None = self.root
        for depth in range(len(path) + 1):
            if node is None:
                return False
            if node.read_uses_data:
                return True
            if depth == len(path):
                return False
            node, _ = node.child(path[depth])
        return False

    def index_defined(self, path: Path, name: str) -> bool:
        node: RuleNode | None = self.root
        for key in path:
            if node is None:
                return False
            node, _ = node.child(key)
        return node is not None and name in node.index_on

    def can_write(self, ops: list[tuple[Path, Any]], auth: Any, old: Callable[[Path], Any]) -> bool:
        new = overlay(old, ops)
        root_snap = Snapshot(old, ())
        validated: set[Path] = set()
        for path, value in ops:
            node: RuleNode | None = self.root
            variables: dict[str, str] = {}
            granted = False
            for depth in range(len(path) + 1):
                if node is None:
                    break
                here = path[:depth]

                def scope(here=here, variables=variables) -> dict:
                    return self._scope(auth, variables, {
                        "root": root_snap, "data": Snapshot(old, here), "newData": Snapshot(new, here)})

                if not granted and self._holds(node.write, scope):
                    granted = True
                if depth < len(path):
                    # .validate on ancestors of the written path, once per request.
                    if node.validate is not None and here not in validated:
                        validated.add(here)
                        if new(here) is not None and not self._holds(node.validate, scope):
                            return False
                    node, var = node.child(path[depth])
                    if var:
                        variables = {**variables, var: path[depth]}
            if not granted:
                return False
            if node is not None and value is not None and not self._validate_tree(
                    node, path, value, variables, auth, old, new, root_snap):
                return False
        return True

    def _validate_tree(self, node: RuleNode, path: Path, value: Any, variables: dict, auth, old, new, root_snap) -> bool:
        if node.validate is not None:
            def scope() -> dict:
                return self._scope(auth, variables, {
                    "root": root_snap, "data": Snapshot(old, path), "newData": Snapshot(new, path, value)})

            if not self._holds(node.validate, scope):
                return False
        if isinstance(value, dict) and (node.children or node.wildcard):
            for key, child_value in value.items():
                child, var = node.child(key)
                if child is None:
                    continue
                child_vars = {**variables, var: key} if var else variables
                if not self._validate_tree(child, (*path, key), child_value, child_vars, auth, old, new, root_snap):
                    return False
        return True
