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

As in production, an error inside a condition (say ``request.auth.uid`` when ``request.auth`` is
null) makes that condition false; ``||`` and ``&&`` still short-circuit around an erroring side.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

METHODS = {"get", "list", "create", "update", "delete"}
_EXPAND = {"read": {"get", "list"}, "write": {"create", "update", "delete"}}


class RulesSyntaxError(ValueError):
    """The rules file uses syntax outside the supported subset, or is malformed."""


class RulesEvalError(Exception):
    """A condition could not be evaluated (null access, wrong type...): it counts as false."""


# ---------------------------------------------------------------------------------------------
# Tokenizer

_TOKEN = re.compile(
    r"""
    (?P<ws>\s+|//[^\n]*|/\*.*?\*/)
  | (?P<num>\d+\.\d+|\d+)
  | (?P<str>'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")
  | (?P<name>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<op>&&|\|\||==|!=|<=|>=|[-+*/%!<>(){}\[\],.;:?=])
    """,
    re.VERBOSE | re.DOTALL,
)


@dataclass
class Tok:
    kind: str  # num str name op path end
    value: Any
    pos: int


def _unescape(text: str) -> str:
    body = text[1:-1]
    return re.sub(r"\\(.)", lambda m: {"n": "\n", "t": "\t"}.get(m.group(1), m.group(1)), body)


def tokenize(source: str) -> list[Tok]:
    tokens: list[Tok] = []
    pos = 0
    while pos < len(source):
        if tokens and tokens[-1].kind == "name" and tokens[-1].value == "match":
            # A match path is raw text up to the next whitespace: /cases/{uid}/{file=**}
            m = re.compile(r"\s*(/\S*)").match(source, pos)
            if not m:
                raise RulesSyntaxError(f"expected a path after 'match' at {_where(source, pos)}")
            tokens.append(Tok("path", m.group(1), m.start(1)))
            pos = m.end()
            continue
        m = _TOKEN.match(source, pos)
        if not m:
            raise RulesSyntaxError(f"unexpected character {source[pos]!r} at {_where(source, pos)}")
        kind = m.lastgroup
        text = m.group(kind)
        if kind == "num":
            tokens.append(Tok("num", float(text) if "." in text else int(text), pos))
        elif kind == "str":
            tokens.append(Tok("str", _unescape(text), pos))
        elif kind in ("name", "op"):
            tokens.append(Tok(kind, text, pos))
        pos = m.end()
    tokens.append(Tok("end", None, len(source)))
    return tokens


def _where(source: str, pos: int) -> str:
    line = source.count("\n", 0, pos) + 1
    col = pos - (source.rfind("\n", 0, pos) + 1) + 1
    return f"line {line}, column {col}"


# ---------------------------------------------------------------------------------------------
# Syntax tree

Expr = tuple  # ("lit", v) ("var", name) ("get", obj, name) ("index", obj, key) ("call", obj|None, name, args)
# ("un", op, e) ("bin", op, a, b) ("cond", c, a, b) ("list", [e])


@dataclass
class Function:
    name: str
    params: list[str]
    lets: list[tuple[str, Expr]]
    body: Expr


@dataclass
class Allow:
    methods: set[str]
    condition: Expr | None


@dataclass
class Match:
    pattern: list[str]  # segments: "lit", "{var}", "{var=**}"
    allows: list[Allow] = field(default_factory=list)
    matches: list[Match] = field(default_factory=list)
    functions: dict[str, Function] = field(default_factory=dict)


class _Parser:
    def __init__(self, source: str):
        self.source = source
        self.toks = tokenize(source)
        self.i = 0

    # helpers
    def peek(self, offset: int = 0) -> Tok:
        return self.toks[min(self.i + offset, len(self.toks) - 1)]

    def next(self) -> Tok:
        tok = self.toks[self.i]
        self.i = min(self.i + 1, len(self.toks) - 1)
        return tok

    def error(self, message: str, tok: Tok | None = None) -> RulesSyntaxError:
        tok = tok or self.peek()
        return RulesSyntaxError(f"{message} at {_where(self.source, tok.pos)}")

    def at(self, kind: str, value: Any = None) -> bool:
        tok = self.peek()
        return tok.kind == kind and (value is None or tok.value == value)

    def expect(self, kind: str, value: Any = None) -> Tok:
        if not self.at(kind, value):
            got = self.peek()
            raise self.error(f"expected {value or kind!r}, got {got.value!r}")
        return self.next()

    # statements
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
            condition = self.parse_expr()
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
        lets: list[tuple[str, Expr]] = []
        while self.at("name", "let"):
            self.next()
            var = self.expect("name").value
            self.expect("op", "=")
            lets.append((var, self.parse_expr()))
            self.expect("op", ";")
        self.expect("name", "return")
        body = self.parse_expr()
        self.expect("op", ";")
        self.expect("op", "}")
        return Function(name, params, lets, body)

    # expressions, lowest precedence first
    def parse_expr(self) -> Expr:
        cond = self.parse_or()
        if self.at("op", "?"):
            self.next()
            a = self.parse_expr()
            self.expect("op", ":")
            b = self.parse_expr()
            return ("cond", cond, a, b)
        return cond

    def parse_or(self) -> Expr:
        left = self.parse_and()
        while self.at("op", "||"):
            self.next()
            left = ("bin", "||", left, self.parse_and())
        return left

    def parse_and(self) -> Expr:
        left = self.parse_rel()
        while self.at("op", "&&"):
            self.next()
            left = ("bin", "&&", left, self.parse_rel())
        return left

    def parse_rel(self) -> Expr:
        left = self.parse_add()
        while self.peek().value in ("==", "!=", "<", "<=", ">", ">=") and self.peek().kind == "op" or self.at(
            "name", "in"
        ):
            op = self.next().value
            left = ("bin", op, left, self.parse_add())
        return left

    def parse_add(self) -> Expr:
        left = self.parse_mul()
        while self.peek().kind == "op" and self.peek().value in ("+", "-"):
            op = self.next().value
            left = ("bin", op, left, self.parse_mul())
        return left

    def parse_mul(self) -> Expr:
        left = self.parse_unary()
        while self.peek().kind == "op" and self.peek().value in ("*", "/", "%"):
            op = self.next().value
            left = ("bin", op, left, self.parse_unary())
        return left

    def parse_unary(self) -> Expr:
        if self.peek().kind == "op" and self.peek().value in ("!", "-"):
            op = self.next().value
            return ("un", op, self.parse_unary())
        return self.parse_postfix()

    def parse_postfix(self) -> Expr:
        expr = self.parse_primary()
        while True:
            if self.at("op", "."):
                self.next()
                name = self.expect("name").value
                expr = ("call", expr, name, self.parse_args()) if self.at("op", "(") else ("get", expr, name)
            elif self.at("op", "["):
                self.next()
                key = self.parse_expr()
                self.expect("op", "]")
                expr = ("index", expr, key)
            else:
                return expr

    def parse_args(self) -> list[Expr]:
        self.expect("op", "(")
        args: list[Expr] = []
        while not self.at("op", ")"):
            args.append(self.parse_expr())
            if not self.at("op", ")"):
                self.expect("op", ",")
        self.expect("op", ")")
        return args

    def parse_primary(self) -> Expr:
        tok = self.next()
        if tok.kind in ("num", "str"):
            return ("lit", tok.value)
        if tok.kind == "name":
            if tok.value in ("true", "false"):
                return ("lit", tok.value == "true")
            if tok.value == "null":
                return ("lit", None)
            if self.at("op", "("):
                return ("call", None, tok.value, self.parse_args())
            return ("var", tok.value)
        if tok.kind == "op" and tok.value == "(":
            expr = self.parse_expr()
            self.expect("op", ")")
            return expr
        if tok.kind == "op" and tok.value == "[":
            items: list[Expr] = []
            while not self.at("op", "]"):
                items.append(self.parse_expr())
                if not self.at("op", "]"):
                    self.expect("op", ",")
            self.expect("op", "]")
            return ("list", items)
        raise self.error(f"unexpected {tok.value!r} in expression", tok)


# ---------------------------------------------------------------------------------------------
# Evaluation

_MAX_CALL_DEPTH = 20


def _type_check(value: Any, kinds: tuple[type, ...], what: str) -> Any:
    if isinstance(value, bool) and bool not in kinds:
        raise RulesEvalError(f"{what}: expected {kinds}, got bool")
    if not isinstance(value, kinds):
        raise RulesEvalError(f"{what}: expected {kinds}, got {type(value).__name__}")
    return value


def _method(obj: Any, name: str, args: list[Any]) -> Any:
    if isinstance(obj, str):
        if name == "matches" and len(args) == 1:
            try:
                return re.fullmatch(_type_check(args[0], (str,), "matches"), obj) is not None
            except re.error as exc:
                raise RulesEvalError(f"bad regex: {exc}") from None
        if name == "size" and not args:
            return len(obj)
        if name in ("lower", "upper", "trim") and not args:
            return {"lower": obj.lower, "upper": obj.upper, "trim": obj.strip}[name]()
    if isinstance(obj, list):
        if name == "size" and not args:
            return len(obj)
        if name in ("hasAny", "hasAll", "hasOnly") and len(args) == 1:
            other = _type_check(args[0], (list,), name)
            if name == "hasAny":
                return any(x in obj for x in other)
            if name == "hasAll":
                return all(x in obj for x in other)
            return all(x in other for x in obj)
    if isinstance(obj, dict):
        if name == "size" and not args:
            return len(obj)
        if name == "keys" and not args:
            return list(obj)
        if name == "get" and len(args) == 2:
            return obj.get(args[0], args[1])
    raise RulesEvalError(f"no method {name}() with {len(args)} argument(s) on {type(obj).__name__}")


def _compare(op: str, a: Any, b: Any) -> bool:
    if op == "==":
        return a == b and type(a) is type(b) or (_is_num(a) and _is_num(b) and a == b)
    if op == "!=":
        return not _compare("==", a, b)
    if not ((_is_num(a) and _is_num(b)) or (isinstance(a, str) and isinstance(b, str))):
        raise RulesEvalError(f"cannot compare {type(a).__name__} and {type(b).__name__}")
    return {"<": a < b, "<=": a <= b, ">": a > b, ">=": a >= b}[op]


def _is_num(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


class _Evaluator:
    def __init__(self, functions: dict[str, Function], variables: dict[str, Any]):
        self.functions = functions
        self.variables = variables
        self.depth = 0

    def truth(self, expr: Expr) -> bool:
        value = self.eval(expr)
        if not isinstance(value, bool):
            raise RulesEvalError(f"condition is {type(value).__name__}, not bool")
        return value

    def eval(self, expr: Expr, scope: dict[str, Any] | None = None) -> Any:
        scope = self.variables if scope is None else scope
        kind = expr[0]
        if kind == "lit":
            return expr[1]
        if kind == "var":
            if expr[1] not in scope:
                raise RulesEvalError(f"unknown variable {expr[1]!r}")
            return scope[expr[1]]
        if kind == "list":
            return [self.eval(e, scope) for e in expr[1]]
        if kind == "get":
            obj = self.eval(expr[1], scope)
            if not isinstance(obj, dict):
                raise RulesEvalError(f"cannot read .{expr[2]} of {type(obj).__name__}")
            if expr[2] not in obj:
                raise RulesEvalError(f"no field {expr[2]!r}")
            return obj[expr[2]]
        if kind == "index":
            obj, key = self.eval(expr[1], scope), self.eval(expr[2], scope)
            try:
                return obj[key]
            except (KeyError, IndexError, TypeError):
                raise RulesEvalError(f"cannot index {type(obj).__name__} with {key!r}") from None
        if kind == "call":
            args = [self.eval(a, scope) for a in expr[3]]
            if expr[1] is None:
                return self.call(expr[2], args)
            return _method(self.eval(expr[1], scope), expr[2], args)
        if kind == "un":
            value = self.eval(expr[2], scope)
            if expr[1] == "!":
                return not _type_check(value, (bool,), "!")
            return -_type_check(value, (int, float), "unary -")
        if kind == "cond":
            test = self.eval(expr[1], scope)
            return self.eval(expr[2] if _type_check(test, (bool,), "?:") else expr[3], scope)
        if kind == "bin":
            return self.binary(expr[1], expr[2], expr[3], scope)
        raise RulesEvalError(f"unknown expression {kind}")

    def binary(self, op: str, left: Expr, right: Expr, scope: dict[str, Any]) -> Any:
        if op in ("&&", "||"):
            stop = op == "||"  # the value that decides the result on its own
            try:
                a = _type_check(self.eval(left, scope), (bool,), op)
            except RulesEvalError:
                b = _type_check(self.eval(right, scope), (bool,), op)
                if b is stop:
                    return stop
                raise
            if a is stop:
                return stop
            return _type_check(self.eval(right, scope), (bool,), op)
        a, b = self.eval(left, scope), self.eval(right, scope)
        if op in ("==", "!=", "<", "<=", ">", ">="):
            return _compare(op, a, b)
        if op == "in":
            if isinstance(b, list | dict):
                return a in b
            raise RulesEvalError("right side of 'in' must be a list or map")
        if op == "+" and isinstance(a, str) and isinstance(b, str):
            return a + b
        if op == "+" and isinstance(a, list) and isinstance(b, list):
            return a + b
        if not (_is_num(a) and _is_num(b)):
            raise RulesEvalError(f"operator {op} needs numbers")
        if op in ("/", "%") and b == 0:
            raise RulesEvalError("division by zero")
        if op == "+":
            return a + b
        if op == "-":
            return a - b
        if op == "*":
            return a * b
        if op == "%":
            return a % b
        return int(a / b) if isinstance(a, int) and isinstance(b, int) else a / b

    def call(self, name: str, args: list[Any]) -> Any:
        fn = self.functions.get(name)
        if fn is None:
            raise RulesEvalError(f"unknown function {name}()")
        if len(args) != len(fn.params):
            raise RulesEvalError(f"{name}() takes {len(fn.params)} argument(s)")
        if self.depth >= _MAX_CALL_DEPTH:
            raise RulesEvalError("function calls nested too deeply")
        scope = dict(self.variables)
        scope.update(zip(fn.params, args, strict=True))
        self.depth += 1
        try:
            for var, value in fn.lets:
                scope[var] = self.eval(value, scope)
            return self.eval(fn.body, scope)
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
        self.root = _Parser(source).parse_file()

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
            scope = {**variables, **bindings}
            try:
                if _Evaluator(functions, scope).truth(allow.condition):
                    return Decision(True, "condition true")
            except RulesEvalError:
                continue
        return Decision(False, f"no rule in {self.origin} allows {method} on {name!r}")

    def _applicable(
        self, block: Match, remaining: list[str], bindings: dict[str, str], functions: dict[str, Function]
    ):
        functions = {**functions, **block.functions}
        for child in block.matches:
            for rest, bound in _match_prefix(child.pattern, remaining):
                merged = {**bindings, **bound}
                if not rest:
                    for allow in child.allows:
                        yield allow, merged, {**functions, **child.functions}
                yield from self._applicable(child, rest, merged, functions)


def _match_prefix(pattern: list[str], segments: list[str]):
    """Ways ``pattern`` matches a prefix of ``segments``: (remaining segments, bindings)."""
    bound: dict[str, Any] = {}
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

