"""The expression language shared by Firebase security rules (RTDB rules strings, Storage conditions).

Both rule languages are JavaScript-like expressions with strict typing: ``==`` never coerces, an
ordered comparison of different types, arithmetic on non-numbers or a member of ``null`` is an
evaluation error, and an evaluation error makes the whole rule ``false`` (the caller catches
:class:`RuleError`). Expressions are compiled once into an AST of tuples; what a name or a member means
(``auth``, ``data.child(...)``, ``request.resource``) is decided by the caller through :class:`Scope`
and by objects implementing :class:`Member`, so the RTDB and Storage engines share this core.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any


class RuleError(Exception):
    """Evaluation error: the rule that raised it counts as false."""


class RuleSyntaxError(ValueError):
    """A rules expression that does not parse (reported when the rules file is loaded)."""


class Member:
    """Objects that expose properties and methods to rules (snapshots, paths...)."""

    def rule_member(self, name: str) -> Any:  # pragma: no cover - interface
        raise RuleError(f"no member {name!r}")


@dataclass(frozen=True)
class Method:
    """A bound method value: only callable, never compared or stored."""

    name: str
    func: Callable[..., Any]


@dataclass(frozen=True)
class Regex:
    pattern: re.Pattern


_TOKEN = re.compile(
    r"""\s*(?:
        (?P<num>\d+\.\d*(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?|\d+(?:[eE][+-]?\d+)?)
      | (?P<str>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*')
      | (?P<name>[A-Za-z_$][A-Za-z0-9_$]*)
      | (?P<op>===|!==|==|!=|<=|>=|&&|\|\||[-+*/%<>!?:.,()\[\]])
    )""",
    re.VERBOSE,
)
_REGEX_LITERAL = re.compile(r"\s*/((?:[^/\\\n]|\\.)+)/([a-z]*)")
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "b": "\b", "f": "\f", "v": "\v", "0": "\0"}


def _unquote(text: str) -> str:
    body = text[1:-1]
    out, i = [], 0
    while i < len(body):
        ch = body[i]
        if ch == "\\" and i + 1 < len(body):
            nxt = body[i + 1]
            if nxt == "u" and i + 5 < len(body) + 0:
                out.append(chr(int(body[i + 2 : i + 6], 16)))
                i += 6
                continue
            out.append(_ESCAPES.get(nxt, nxt))
            i += 2
            continue
        out.append(ch)
        i += 1
    return "".join(out)


def _tokenize(source: str) -> list[tuple[str, Any]]:
    tokens: list[tuple[str, Any]] = []
    pos = 0
    while pos < len(source):
        if source[pos:].strip() == "":
            break
        # A regex literal can only be the argument of matches(...).
        if len(tokens) >= 2 and tokens[-1] == ("op", "(") and tokens[-2] == ("name", "matches"):
            m = _REGEX_LITERAL.match(source, pos)
            if m:
                flags = re.IGNORECASE if "i" in m.group(2) else 0
                if set(m.group(2)) - {"i"}:
                    raise RuleSyntaxError(f"unsupported regex flags {m.group(2)!r}")
                try:
                    tokens.append(("regex", Regex(re.compile(m.group(1), flags))))
                except re.error as exc:
                    raise RuleSyntaxError(f"bad regex /{m.group(1)}/: {exc}") from None
                pos = m.end()
                continue
        m = _TOKEN.match(source, pos)
        if not m or m.end() == pos:
            raise RuleSyntaxError(f"unexpected character at {pos}: {source[pos:pos + 20]!r}")
        kind = m.lastgroup
        text = m.group(kind)
        if kind == "num":
            value: Any = float(text) if any(c in text for c in ".eE") else int(text)
            tokens.append(("num", value))
        elif kind == "str":
            tokens.append(("str", _unquote(text)))
        else:
            tokens.append((kind, text))
        pos = m.end()
    tokens.append(("end", None))
    return tokens


# Binding powers for binary operators (higher binds tighter).
_BINARY = {
    "||": 1, "&&": 2, "==": 3, "!=": 3, "===": 3, "!==": 3,
    "<": 4, "<=": 4, ">": 4, ">=": 4, "+": 5, "-": 5, "*": 6, "/": 6, "%": 6,
}


class _Parser:
    def __init__(self, source: str):
        self.source = source
        self.tokens = _tokenize(source)
        self.i = 0

    def peek(self) -> tuple[str, Any]:
        return self.tokens[self.i]

    def take(self) -> tuple[str, Any]:
        tok = self.tokens[self.i]
        self.i += 1
        return tok

    def expect(self, op: str) -> None:
        tok = self.take()
        if tok != ("op", op):
            raise RuleSyntaxError(f"expected {op!r} but found {tok[1]!r} in {self.source!r}")

    def parse(self) -> tuple:
        node = self.expression()
        if self.peek()[0] != "end":
            raise RuleSyntaxError(f"unexpected {self.peek()[1]!r} in {self.source!r}")
        return node

    def expression(self) -> tuple:
        cond = self.binary(0)
        if self.peek() == ("op", "?"):
            self.take()
            yes = self.expression()
            self.expect(":")
            no = self.expression()
            return ("cond", cond, yes, no)
        return cond

    def binary(self, min_power: int) -> tuple:
        left = self.unary()
        while True:
            kind, op = self.peek()
            power = _BINARY.get(op) if kind == "op" else None
            if power is None or power <= min_power:
                return left
            self.take()
            right = self.binary(power)
            left = ("bin", op, left, right)

    def unary(self) -> tuple:
        if self.peek() in (("op", "!"), ("op", "-")):
            op = self.take()[1]
            return ("unary", op, self.unary())
        return self.postfix(self.primary())

    def primary(self) -> tuple:
        kind, value = self.take()
        if kind in ("num", "str"):
            return ("lit", value)
        if kind == "regex":
            return ("lit", value)
        if kind == "name":
            if value in ("true", "false"):
                return ("lit", value == "true")
            if value == "null":
                return ("lit", None)
            return ("name", value)
        if (kind, value) == ("op", "("):
            node = self.expression()
            self.expect(")")
            return node
        if (kind, value) == ("op", "["):
            items = []
            if self.peek() != ("op", "]"):
                items.append(self.expression())
                while self.peek() == ("op", ","):
                    self.take()
                    items.append(self.expression())
            self.expect("]")
            return ("list", tuple(items))
        if kind == "end":
            raise RuleSyntaxError(f"unexpected end of expression in {self.source!r}")
        raise RuleSyntaxError(f"unexpected {value!r} in {self.source!r}")

    def postfix(self, node: tuple) -> tuple:
        while True:
            tok = self.peek()
            if tok == ("op", "."):
                self.take()
                kind, name = self.take()
                if kind != "name":
                    raise RuleSyntaxError(f"expected a name after '.' in {self.source!r}")
                node = ("member", node, name)
            elif tok == ("op", "["):
                self.take()
                index = self.expression()
                self.expect("]")
                node = ("index", node, index)
            elif tok == ("op", "("):
                self.take()
                args = []
                if self.peek() != ("op", ")"):
                    args.append(self.expression())
                    while self.peek() == ("op", ","):
                        self.take()
                        args.append(self.expression())
                self.expect(")")
                node = ("call", node, tuple(args))
            else:
                return node


def parse(source: str) -> tuple:
    """The AST of one rules expression; raises RuleSyntaxError."""
    return _Parser(source).parse()


def names_used(ast: tuple) -> set[str]:
    """Top-level variable names an expression reads (e.g. to know if a rule depends on data)."""
    found: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, tuple) and node:
            if node[0] == "name":
                found.add(node[1])
                return
            for part in node[1:]:
                if isinstance(part, tuple):
                    walk(part)

    walk(ast)
    return found


def kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list | tuple):
        return "list"
    return "object"


def _string_member(s: str, name: str) -> Any:
    if name == "length":
        return len(s)

    def need_str(arg: Any) -> str:
        if not isinstance(arg, str):
            raise RuleError(f"{name}() needs a string")
        return arg

    methods: dict[str, Callable[..., Any]] = {
        "contains": lambda x: need_str(x) in s,
        "beginsWith": lambda x: s.startswith(need_str(x)),
        "endsWith": lambda x: s.endswith(need_str(x)),
        "replace": lambda a, b: s.replace(need_str(a), need_str(b)),
        "toLowerCase": lambda: s.lower(),
        "toUpperCase": lambda: s.upper(),
        "lower": lambda: s.lower(),
        "upper": lambda: s.upper(),
        "size": lambda: len(s),
        "trim": lambda: s.strip(),
        "split": lambda sep: s.split(need_str(sep)),
    }

    def matches(rx: Any) -> bool:
        if isinstance(rx, Regex):
            return rx.pattern.search(s) is not None
        if isinstance(rx, str):  # Storage rules pass a string that must match the whole value
            try:
                return re.fullmatch(rx, s) is not None
            except re.error as exc:
                raise RuleError(f"bad regex {rx!r}: {exc}") from None
        raise RuleError("matches() needs a regex")

    methods["matches"] = matches
    if name in methods:
        return Method(name, methods[name])
    raise RuleError(f"strings have no member {name!r}")


def _member(obj: Any, name: str) -> Any:
    if obj is None:
        raise RuleError(f"cannot read {name!r} of null")
    if isinstance(obj, Member):
        return obj.rule_member(name)
    if isinstance(obj, Mapping):
        return obj.get(name)
    if isinstance(obj, str):
        return _string_member(obj, name)
    if isinstance(obj, list | tuple) and name in ("size", "length"):
        return Method(name, lambda: len(obj)) if name == "size" else len(obj)
    if isinstance(obj, list | tuple) and name == "hasAll":
        return Method(name, lambda other: all(x in obj for x in other))
    if isinstance(obj, list | tuple) and name == "hasAny":
        return Method(name, lambda other: any(x in obj for x in other))
    raise RuleError(f"{kind(obj)} has no member {name!r}")


def _equal(a: Any, b: Any) -> bool:
    ka, kb = kind(a), kind(b)
    if ka != kb:
        return False
    if ka in ("null", "bool", "number", "string", "list"):
        return a == b
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        return dict(a) == dict(b)
    return a is b


def _arith(op: str, a: Any, b: Any) -> Any:
    if op == "+" and isinstance(a, str) and isinstance(b, str):
        return a + b
    if kind(a) != "number" or kind(b) != "number":
        raise RuleError(f"{op} needs numbers")
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    if b == 0:
        raise RuleError("division by zero")
    if op == "/":
        return a / b
    return a % b


def _compare(op: str, a: Any, b: Any) -> bool:
    ka = kind(a)
    if ka != kind(b) or ka not in ("number", "string"):
        raise RuleError(f"cannot compare {ka} with {kind(b)}")
    if op == "<":
        return a < b
    if op == "<=":
        return a <= b
    if op == ">":
        return a > b
    return a >= b


Scope = Mapping[str, Any]


def evaluate(ast: tuple, scope: Scope) -> Any:
    """Value of an expression; raises RuleError on any evaluation error."""
    tag = ast[0]
    if tag == "lit":
        return ast[1]
    if tag == "name":
        if ast[1] not in scope:
            raise RuleError(f"unknown variable {ast[1]!r}")
        return scope[ast[1]]
    if tag == "member":
        return _member(evaluate(ast[1], scope), ast[2])
    if tag == "index":
        obj, key = evaluate(ast[1], scope), evaluate(ast[2], scope)
        if isinstance(obj, Mapping) and isinstance(key, str):
            return obj.get(key)
        if isinstance(obj, list | tuple) and isinstance(key, int) and not isinstance(key, bool):
            if -len(obj) <= key < len(obj):
                return obj[key]
            raise RuleError("index out of range")
        if isinstance(obj, Member) and isinstance(key, str):
            return obj.rule_member(key)
        raise RuleError("bad index")
    if tag == "call":
        func = evaluate(ast[1], scope)
        if not isinstance(func, Method):
            raise RuleError("not a function")
        args = [evaluate(a, scope) for a in ast[2]]
        try:
            return func.func(*args)
        except TypeError as exc:
            raise RuleError(f"{func.name}(): {exc}") from None
    if tag == "list":
        return [evaluate(a, scope) for a in ast[1]]
    if tag == "unary":
        value = evaluate(ast[2], scope)
        if ast[1] == "!":
            if not isinstance(value, bool):
                raise RuleError("! needs a boolean")
            return not value
        if kind(value) != "number":
            raise RuleError("unary - needs a number")
        return -value
    if tag == "cond":
        test = evaluate(ast[1], scope)
        if not isinstance(test, bool):
            raise RuleError("condition must be a boolean")
        return evaluate(ast[2] if test else ast[3], scope)
    if tag == "bin":
        op = ast[1]
        if op in ("&&", "||"):
            left = evaluate(ast[2], scope)
            if not isinstance(left, bool):
                raise RuleError(f"{op} needs booleans")
            if (op == "&&" and not left) or (op == "||" and left):
                return left
            right = evaluate(ast[3], scope)
            if not isinstance(right, bool):
                raise RuleError(f"{op} needs booleans")
            return right
        left, right = evaluate(ast[2], scope), evaluate(ast[3], scope)
        if op in ("==", "==="):
            return _equal(left, right)
        if op in ("!=", "!=="):
            return not _equal(left, right)
        if op in ("<", "<=", ">", ">="):
            return _compare(op, left, right)
        return _arith(op, left, right)
    raise RuleError(f"unknown node {tag}")  # pragma: no cover


def check(ast: tuple, scope: Scope) -> bool:
    """True only if the expression evaluates to exactly ``true``; errors and non-booleans deny."""
    try:
        return evaluate(ast, scope) is True
    except RuleError:
        return False
    except (RecursionError, OverflowError, ValueError, ZeroDivisionError):
        return False


def strip_comments(text: str) -> str:
    """Remove // and /* */ comments outside of strings (rules files allow them, JSON does not)."""
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            out.append(text[i : j + 1])
            i = j + 1
        elif text.startswith("//", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            i = n if j < 0 else j + 2
        else:
            out.append(ch)
            i += 1
    return "".join(out)
