"""Parse and evaluate ``storage.rules`` (the Firebase Security Rules file deployed to production).

Only the subset the project's rules use is supported, and anything else is refused at load time
rather than silently ignored, so the file that localbase enforces is never more permissive than the
one ``firebase deploy`` pushes:

* ``rules_version``, ``service firebase.storage``, nested ``match`` blocks with ``{var}`` and
  ``{var=**}`` wildcards (``**`` matches zero or more segments, as in rules version 2);
* ``allow <read|write|get|list|create|update|delete>[, ...]: if <expr>;`` (or without a condition);
* ``function f(a, b) { let x = ...; return <expr>; }``;
* expressions: literals, ``request``/``resource`` fields, wildcard variables, ``! && || == != < <= >
  >= + - * / % in``, ``?:``, lists, and the methods ``matches size lower upper trim hasAny hasAll
  hasOnly keys get``.

Expressions are read and evaluated by the core the database rules use too (:mod:`localbase.rules_expr`);
this module is the statement layer (service, match, allow, function) and the Storage dialect:
relational operators and ``in`` share one precedence level, a missing map field is an error rather
than null, integers divide to integers, and a bare call ``f(x)`` is a user function.

As in production, an error inside a condition (say ``request.auth.uid`` when ``request.auth`` is
null) makes that condition false; ``||`` and ``&&`` still short-circuit around an erroring side.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from localbase.rules_expr import Dialect, Evaluator, Node, Parser, RuleError, RuleSyntaxError, Scope, Tok

METHODS = {"get", "list", "create", "update", "delete"}
_EXPAND = {"read": {"get", "list"}, "write": {"create", "update", "delete"}}

_MATCH_PATH = re.compile(r"/\S*")


def _match_path(tokens: list[Tok], source: str, pos: int) -> tuple[Tok, int] | None:
    """After ``match`` comes a raw path up to the next whitespace: /cases/{uid}/{file=**}."""
    if not tokens or (tokens[-1].kind, tokens[-1].value) != ("name", "match"):
        return None
    m = _MATCH_PATH.match(source, pos)
    if not m:
        raise RuleSyntaxError("expected a path after 'match'", source, pos)
    return Tok("path", m.group(), pos), m.end()


# storage.rules expressions are CEL-like: ordering, equality and ``in`` share one level (left to
# right), ``//`` and ``/* */`` comments sit between statements, and lists may end with a comma.
_RELATIONAL = ("==", "!=", "<", "<=", ">", ">=", "in")
STORAGE = Dialect(
    name="storage.rules",
    binary={"||": 1, "&&": 2, **dict.fromkeys(_RELATIONAL, 3), "+": 4, "-": 4, "*": 5, "/": 5, "%": 5},
    operators=("{", "}", ";", "="),
    comments=True,
    trailing_commas=True,
    lexer_hook=_match_path,
)


# ---------------------------------------------------------------------------------------------
# Statements


@dataclass
class Function:
    name: str
    params: list[str]
    lets: list[tuple[str, Node]]
    body: Node


@dataclass
class Allow:
    methods: set[str]
    condition: Node | None


@dataclass
class Match:
    pattern: list[str]  # segments: "lit", "{var}", "{var=**}"
    allows: list[Allow] = field(default_factory=list)
    matches: list[Match] = field(default_factory=list)
    functions: dict[str, Function] = field(default_factory=dict)


class _Parser(Parser):
    """The statements of a rules file; the expressions inside them are the core parser's."""

    def __init__(self, source: str):
        super().__init__(source, STORAGE)

    def parse_file(self) -> Match:
        if self.at("name", "rules_version"):
            self.next()
            self.expect("op", "=")
            version = self.expect("str").value
            if version != "2":
                raise self.error("only rules_version = '2' is supported")
            self.expect("op", ";")
        self.expect("name", "service")
        name = self.expect("name").value
        while self.at("op", "."):
            self.next()
            name += "." + self.expect("name").value
        if name != "firebase.storage":
            raise self.error(f"expected 'service firebase.storage', got {name!r}")
        root = Match(pattern=[])
        self.expect("op", "{")
        self.parse_block(root)
        self.expect("end")
        return root

    def parse_block(self, block: Match) -> None:
        while not self.at("op", "}"):
            tok = self.peek()
            if self.at("name", "match"):
                block.matches.append(self.parse_match())
            elif self.at("name", "allow"):
                block.allows.append(self.parse_allow())
            elif self.at("name", "function"):
                fn = self.parse_function()
                block.functions[fn.name] = fn
            else:
                raise self.error(f"unexpected {tok.value!r}: expected match, allow or function")
        self.expect("op", "}")

    def parse_match(self) -> Match:
        self.expect("name", "match")
        path_tok = self.expect("path")
        segments = [s for s in path_tok.value.split("/") if s]
        for n, seg in enumerate(segments):
            if seg.startswith("{"):
                m = re.fullmatch(r"\{([A-Za-z_]\w*)(=\*\*)?\}", seg)
                if not m:
                    raise self.error(f"bad wildcard segment {seg!r}", path_tok)
                if m.group(2) and n != len(segments) - 1:
                    raise self.error("a {name=**} wildcard must be the last segment", path_tok)
            elif "{" in seg or "}" in seg or "*" in seg:
                raise self.error(f"bad path segment {seg!r}", path_tok)
        block = Match(pattern=segments)
        self.expect("op", "{")
        self.parse_block(block)
        return block

    def parse_allow(self) -> Allow:
        self.expect("name", "allow")
        methods: set[str] = set()
        while True:
            tok = self.expect("name")
            if tok.value in _EXPAND:
                methods |= _EXPAND[tok.value]
            elif tok.value in METHODS:
                methods.add(tok.value)
            else:
                raise self.error(f"unknown method {tok.value!r}", tok)
            if not self.at("op", ","):
                break
            self.next()
        condition = None
        if self.at("op", ":"):
            self.next()
            self.expect("name", "if")
            condition = self.expression()
        self.expect("op", ";")
        return Allow(methods, condition)

    def parse_function(self) -> Function:
        self.expect("name", "function")
        name = self.expect("name").value
        self.expect("op", "(")
        params: list[str] = []
        while not self.at("op", ")"):
            params.append(self.expect("name").value)
            if not self.at("op", ")"):
                self.expect("op", ",")
        self.expect("op", ")")
        self.expect("op", "{")
        lets: list[tuple[str, Node]] = []
        while self.at("name", "let"):
            self.next()
            var = self.expect("name").value
            self.expect("op", "=")
            lets.append((var, self.expression()))
            self.expect("op", ";")
        self.expect("name", "return")
        body = self.expression()
        self.expect("op", ";")
        self.expect("op", "}")
        return Function(name, params, lets, body)


# ---------------------------------------------------------------------------------------------
# Evaluation

_MAX_CALL_DEPTH = 20


class StorageEvaluator(Evaluator):
    """Storage semantics on the shared core: strict fields, CEL-like integers, forgiving ``&&``/``||``,
    and the rules file's own functions (each sees the request variables, its arguments and its lets)."""

    methods = {
        "string": frozenset({"matches", "size", "lower", "upper", "trim"}),
        "list": frozenset({"size", "hasAny", "hasAll", "hasOnly"}),
        "map": frozenset({"size", "keys", "get"}),
    }
    int_division = True
    list_concat = True
    forgiving_logic = True

    def __init__(self, scope: Scope, functions: dict[str, Function]):
        super().__init__(scope)
        self.functions = functions
        self.depth = 0

    def call_function(self, name: str, args: list[Any], scope: Scope) -> Any:
        fn = self.functions.get(name)
        if fn is None:
            raise RuleError(f"unknown function {name}()")
        if len(args) != len(fn.params):
            raise RuleError(f"{name}() takes {len(fn.params)} argument(s)")
        if self.depth >= _MAX_CALL_DEPTH:
            raise RuleError("function calls nested too deeply")
        local = dict(self.scope)
        local.update(zip(fn.params, args, strict=True))
        self.depth += 1
        try:
            for var, value in fn.lets:
                local[var] = self.evaluate(value, local)
            return self.evaluate(fn.body, local)
        finally:
            self.depth -= 1


@dataclass
class Decision:
    allowed: bool
    reason: str  # which statement allowed it, or why nothing did (for logs and error messages)


class StorageRules:
    """A parsed ``storage.rules``; :meth:`check` answers one request."""

    def __init__(self, source: str, origin: str = "storage.rules"):
        self.origin = origin
        try:
            self.root = _Parser(source).parse_file()
        except RuleSyntaxError as exc:  # name the file: a malformed one stops start-up
            raise RuleSyntaxError(f"{origin}: {exc.message}", exc.source, exc.pos) from None

    @classmethod
    def from_file(cls, path: Path) -> StorageRules:
        return cls(path.read_text(), origin=str(path))

    @classmethod
    def deny_all(cls) -> StorageRules:
        return cls("rules_version = '2'; service firebase.storage { }", origin="(no storage.rules: deny all)")

    def check(
        self,
        method: str,
        bucket: str,
        name: str,
        auth: dict[str, Any] | None,
        resource: dict[str, Any] | None = None,
        request_resource: dict[str, Any] | None = None,
    ) -> Decision:
        """May a ``method`` (get/list/create/update/delete) on ``name`` in ``bucket`` go ahead?"""
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}")
        segments = ["b", bucket, "o", *[s for s in name.split("/") if s]]
        variables = {
            "request": {
                "auth": auth,
                "method": method,
                "path": "/" + "/".join(segments),
                "resource": request_resource,
            },
            "resource": resource,
        }
        for allow, bindings, functions in self._applicable(self.root, segments, {}, {}):
            if method not in allow.methods:
                continue
            if allow.condition is None:
                return Decision(True, "unconditional allow")
            if StorageEvaluator({**variables, **bindings}, functions).check(allow.condition):
                return Decision(True, "condition true")
        return Decision(False, f"no rule in {self.origin} allows {method} on {name!r}")

    def _applicable(
        self, block: Match, remaining: list[str], bindings: dict[str, str], functions: dict[str, Function]
    ) -> Iterator[tuple[Allow, dict[str, str], dict[str, Function]]]:
        functions = {**functions, **block.functions}
        for child in block.matches:
            for rest, bound in _match_prefix(child.pattern, remaining):
                merged = {**bindings, **bound}
                if not rest:
                    for allow in child.allows:
                        yield allow, merged, {**functions, **child.functions}
                yield from self._applicable(child, rest, merged, functions)


def _match_prefix(pattern: list[str], segments: list[str]) -> Iterator[tuple[list[str], dict[str, str]]]:
    """Ways ``pattern`` matches a prefix of ``segments``: (remaining segments, bindings)."""
    bound: dict[str, str] = {}
    for n, seg in enumerate(pattern):
        if seg.endswith("=**}"):
            bound[seg[1:-4]] = "/".join(segments[n:])
            yield [], bound
            return
        if n >= len(segments):
            return
        if seg.startswith("{"):
            bound[seg[1:-1]] = segments[n]
        elif seg != segments[n]:
            return
    yield segments[len(pattern):], bound

