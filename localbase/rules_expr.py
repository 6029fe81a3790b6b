"""The one expression core of both Firebase rules languages: database.rules.json strings and storage.rules.

The two languages are cousins: JavaScript-like syntax and strict typing (``==`` never coerces; an
ordered comparison of different types, arithmetic on non-numbers or a member of ``null`` is an
evaluation error; an evaluation error makes the rule false). One tokenizer, one parser and one
evaluator serve both, so a fix lands in both engines at once and the places where production really
differs are named instead of hidden in two copies:

* syntax differences are data in a :class:`Dialect`: the operator table (JavaScript precedence and
  ``===`` for the database, one relational level with ``in`` for Storage), number literals, ``$`` in
  names, regex literals, comments, trailing commas, and a lexer hook for a statement layer's tokens;
* semantic differences are a few :class:`Evaluator` hooks and switches that each engine sets: what a
  missing field is, which built-in methods exist, integer division, list ``+``, Storage's forgiving
  ``&&``/``||``, and what a bare call ``f(x)`` means.

Expressions compile once into an AST of tuples: ``("lit", v)``, ``("name", n)``, ``("member", e, n)``,
``("index", e, k)``, ``("call", name-or-member, args)``, ``("list", items)``, ``("unary", op, e)``,
``("bin", op, a, b)``, ``("cond", c, a, b)``. What ``auth``, ``data.child(...)`` or
``request.resource`` mean is up to the caller's scope and to objects implementing :class:`Member`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any, ClassVar

Node = tuple
Scope = Mapping[str, Any]


class RuleError(Exception):
    """Evaluation error: the rule that raised it counts as false."""


class RuleSyntaxError(ValueError):
    """A rules expression or file that does not parse; says where, because it stops start-up."""

    def __init__(self, message: str, source: str | None = None, pos: int | None = None):
        self.message, self.source, self.pos = message, source, pos
        self.line = self.column = None
        if source is not None and pos is not None:
            self.line, self.column = line_column(source, pos)
            message = f"{message} at line {self.line}, column {self.column}"
        super().__init__(message)


def line_column(text: str, pos: int) -> tuple[int, int]:
    """1-based line and column of an offset, as editors show them."""
    return text.count("\n", 0, pos) + 1, pos - (text.rfind("\n", 0, pos) + 1) + 1


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


# ---------------------------------------------------------------------------------------------
# Tokens

@dataclass(frozen=True, slots=True)
class Tok:
    kind: str  # num str name op regex end, or a kind a dialect's lexer hook adds (Storage's "path")
    value: Any
    pos: int


LexerHook = Callable[[list[Tok], str, int], "tuple[Tok, int] | None"]

# Operators of both languages; a dialect adds its own (``===``, or ``{ } ; =`` for statements).
_CORE_OPERATORS = ("==", "!=", "<=", ">=", "&&", "||", *"-+*/%<>!?:.,()[]")
_STRING = r""""(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'"""
_SPACE = re.compile(r"\s+")
_SPACE_AND_COMMENTS = re.compile(r"(?:\s+|//[^\n]*|/\*.*?\*/)+", re.DOTALL)
_REGEX_LITERAL = re.compile(r"/((?:[^/\\\n]|\\.)+)/([a-z]*)")
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "b": "\b", "f": "\f", "v": "\v", "0": "\0"}


@dataclass(frozen=True)
class Dialect:
    """The syntax one rules language adds to or takes from the core (see the module docstring)."""

    name: str
    binary: Mapping[str, int]  # infix operator (or word, like ``in``) -> binding power, higher binds tighter
    operators: tuple[str, ...] = ()  # punctuation beyond the core's
    identifier: str = r"[A-Za-z_][A-Za-z0-9_]*"
    number: str = r"\d+\.\d+|\d+"  # both languages read these; JavaScript adds 1., .5 and 1e3
    regex_literals: bool = False  # ``matches(/re/i)``; without them ``matches`` takes a string
    comments: bool = False  # ``//`` and ``/* */`` between tokens
    trailing_commas: bool = False  # ``[a, b,]`` and ``f(a, b,)``
    lexer_hook: LexerHook | None = None  # raw tokens a statement layer needs, e.g. Storage's match paths
    token: re.Pattern = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        ops = sorted(set(_CORE_OPERATORS + self.operators), key=len, reverse=True)
        pattern = (rf"(?P<num>{self.number})|(?P<str>{_STRING})|(?P<name>{self.identifier})"
                   rf"|(?P<op>{'|'.join(map(re.escape, ops))})")
        object.__setattr__(self, "token", re.compile(pattern))


def _unquote(text: str, source: str, pos: int) -> str:
    body = text[1:-1]
    out, i = [], 0
    while i < len(body):
        ch = body[i]
        if ch == "\\" and i + 1 < len(body):
            nxt = body[i + 1]
            if nxt == "u":
                digits = body[i + 2 : i + 6]
                if not re.fullmatch(r"[0-9a-fA-F]{4}", digits):
                    raise RuleSyntaxError("\\u needs four hex digits", source, pos + 1 + i)
                out.append(chr(int(digits, 16)))
                i += 6
                continue
            out.append(_ESCAPES.get(nxt, nxt))
            i += 2
            continue
        out.append(ch)
        i += 1
    return "".join(out)


def _regex_literal(source: str, pos: int) -> tuple[Tok, int] | None:
    m = _REGEX_LITERAL.match(source, pos)
    if not m:
        return None
    if set(m.group(2)) - {"i"}:
        raise RuleSyntaxError(f"unsupported regex flags {m.group(2)!r}", source, m.start(2))
    try:
        compiled = re.compile(m.group(1), re.IGNORECASE if "i" in m.group(2) else 0)
    except re.error as exc:
        raise RuleSyntaxError(f"bad regex /{m.group(1)}/: {exc}", source, pos) from None
    return Tok("regex", Regex(compiled), pos), m.end()


def tokenize(source: str, dialect: Dialect) -> list[Tok]:
    """Tokens with their offsets (for error positions), ending with an ``end`` token."""
    space = _SPACE_AND_COMMENTS if dialect.comments else _SPACE
    tokens: list[Tok] = []
    pos = 0
    while True:
        m = space.match(source, pos)
        if m:
            pos = m.end()
        if pos >= len(source):
            break
        special = dialect.lexer_hook(tokens, source, pos) if dialect.lexer_hook else None
        if special is None and dialect.regex_literals and [(t.kind, t.value) for t in tokens[-2:]] == [
                ("name", "matches"), ("op", "(")]:
            special = _regex_literal(source, pos)  # a regex literal can only be the argument of matches()
        if special is not None:
            tok, pos = special
            tokens.append(tok)
            continue
        m = dialect.token.match(source, pos)
        if not m:
            raise RuleSyntaxError(f"unexpected character {source[pos]!r}", source, pos)
        kind, text = m.lastgroup, m.group(m.lastgroup)
        if kind == "num":
            tokens.append(Tok("num", float(text) if any(c in text for c in ".eE") else int(text), pos))
        elif kind == "str":
            tokens.append(Tok("str", _unquote(text, source, pos), pos))
        else:
            tokens.append(Tok(kind, text, pos))
        pos = m.end()
    tokens.append(Tok("end", None, len(source)))
    return tokens


# ---------------------------------------------------------------------------------------------
# Parser

_KIND_NAMES = {"name": "a name", "str": "a string", "num": "a number", "path": "a path", "end": "end of input"}


def _describe(tok: Tok) -> str:
    if tok.kind == "end":
        return "end of input"
    if tok.kind == "regex":
        return f"/{tok.value.pattern.pattern}/"
    return repr(tok.value)


class Parser:
    """Expressions by precedence climbing over the dialect's operator table.

    Storage's statement parser subclasses this, so statements and the expressions inside them are
    read from one token stream and report positions the same way."""

    def __init__(self, source: str, dialect: Dialect):
        self.source = source
        self.dialect = dialect
        self.tokens = tokenize(source, dialect)
        self.i = 0

    def peek(self, offset: int = 0) -> Tok:
        return self.tokens[min(self.i + offset, len(self.tokens) - 1)]

    def next(self) -> Tok:
        tok = self.tokens[self.i]
        self.i = min(self.i + 1, len(self.tokens) - 1)
        return tok

    def at(self, kind: str, value: Any = None) -> bool:
        tok = self.peek()
        return tok.kind == kind and (value is None or tok.value == value)

    def error(self, message: str, tok: Tok | None = None) -> RuleSyntaxError:
        return RuleSyntaxError(message, self.source, (tok or self.peek()).pos)

    def expect(self, kind: str, value: Any = None) -> Tok:
        if not self.at(kind, value):
            wanted = repr(value) if value is not None else _KIND_NAMES.get(kind, kind)
            raise self.error(f"expected {wanted}, got {_describe(self.peek())}")
        return self.next()

    def parse(self) -> Node:
        """One whole expression (a database rule string)."""
        node = self.expression()
        if not self.at("end"):
            raise self.error(f"unexpected {_describe(self.peek())}")
        return node

    def expression(self) -> Node:
        cond = self._binary(0)
        if self.at("op", "?"):
            self.next()
            yes = self.expression()
            self.expect("op", ":")
            return ("cond", cond, yes, self.expression())
        return cond

    def _binary(self, min_power: int) -> Node:
        left = self._unary()
        while True:
            tok = self.peek()
            power = self.dialect.binary.get(tok.value) if tok.kind in ("op", "name") else None
            if power is None or power <= min_power:
                return left
            self.next()
            left = ("bin", tok.value, left, self._binary(power))

    def _unary(self) -> Node:
        if self.at("op", "!") or self.at("op", "-"):
            return ("unary", self.next().value, self._unary())
        return self._postfix(self._primary())

    def _primary(self) -> Node:
        tok = self.next()
        if tok.kind in ("num", "str", "regex"):
            return ("lit", tok.value)
        if tok.kind == "name":
            keywords = {"true": True, "false": False, "null": None}
            return ("lit", keywords[tok.value]) if tok.value in keywords else ("name", tok.value)
        if (tok.kind, tok.value) == ("op", "("):
            node = self.expression()
            self.expect("op", ")")
            return node
        if (tok.kind, tok.value) == ("op", "["):
            return ("list", self._items("]"))
        raise self.error(f"expected an expression, got {_describe(tok)}", tok)

    def _items(self, close: str) -> tuple[Node, ...]:
        """Comma-separated expressions up to ``close`` (already past the opening bracket)."""
        items: list[Node] = []
        while not self.at("op", close):
            items.append(self.expression())
            if self.at("op", close):
                break
            self.expect("op", ",")
            if not self.dialect.trailing_commas and self.at("op", close):
                raise self.error(f"expected an expression, got {_describe(self.peek())}")
        self.expect("op", close)
        return tuple(items)

    def _postfix(self, node: Node) -> Node:
        while True:
            if self.at("op", "."):
                self.next()
                node = ("member", node, self.expect("name").value)
            elif self.at("op", "["):
                self.next()
                key = self.expression()
                self.expect("op", "]")
                node = ("index", node, key)
            elif self.at("op", "("):
                if node[0] not in ("name", "member"):  # nothing else could ever hold a function
                    raise self.error("only a function or a method can be called")
                self.next()
                node = ("call", node, self._items(")"))
            else:
                return node


def parse(source: str, dialect: Dialect) -> Node:
    """The AST of one expression; raises RuleSyntaxError naming the position."""
    return Parser(source, dialect).parse()


def names_used(node: Node) -> set[str]:
    """Top-level variable names an expression reads (e.g. to know if a rule depends on data)."""
    found: set[str] = set()

    def walk(part: Any) -> None:
        if isinstance(part, tuple):
            if len(part) == 2 and part[0] == "name":
                found.add(part[1])
                return
            for sub in part:
                walk(sub)

    walk(node)
    return found


# ---------------------------------------------------------------------------------------------
# Values and built-in methods

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
    if isinstance(value, Mapping):
        return "map"
    return "object"


def _need(value: Any, wanted: str, what: str) -> Any:
    if kind(value) != wanted:
        raise RuleError(f"{what} needs a {wanted}, not {kind(value)}")
    return value


def _boolean(value: Any, what: str) -> bool:
    if value is True or value is False:  # the hot path of every rule: no kind() needed
        return value
    raise RuleError(f"{what} needs a bool, not {kind(value)}")


def _matches(s: str, rx: Any) -> bool:
    if isinstance(rx, Regex):  # a literal /re/ (database rules): anchors are explicit
        return rx.pattern.search(s) is not None
    try:  # a string (Storage rules) must match the whole value
        return re.fullmatch(_need(rx, "string", "matches()"), s) is not None
    except re.error as exc:
        raise RuleError(f"bad regex {rx!r}: {exc}") from None


# receiver kind -> method -> implementation(receiver, *args). Each dialect lists the names its
# language has (Evaluator.methods), so one implementation serves both without one language's
# methods leaking into the other.
BUILTINS: dict[str, dict[str, Callable[..., Any]]] = {
    "string": {
        "matches": _matches,
        "size": len,
        "lower": str.lower,
        "upper": str.upper,
        "trim": str.strip,
        "toLowerCase": str.lower,
        "toUpperCase": str.upper,
        "contains": lambda s, x: _need(x, "string", "contains()") in s,
        "beginsWith": lambda s, x: s.startswith(_need(x, "string", "beginsWith()")),
        "endsWith": lambda s, x: s.endswith(_need(x, "string", "endsWith()")),
        "replace": lambda s, a, b: s.replace(_need(a, "string", "replace()"), _need(b, "string", "replace()")),
        "split": lambda s, sep: s.split(_need(sep, "string", "split()")),
    },
    "list": {
        "size": len,
        "hasAny": lambda xs, other: any(x in xs for x in _need(other, "list", "hasAny()")),
        "hasAll": lambda xs, other: all(x in xs for x in _need(other, "list", "hasAll()")),
        "hasOnly": lambda xs, other: all(x in _need(other, "list", "hasOnly()") for x in xs),
    },
    "map": {
        "size": len,
        "keys": list,
        "get": lambda m, key, default: m.get(key, default),
    },
}


def equal(a: Any, b: Any) -> bool:
    """``==``: values of different kinds are never equal (``1 == '1'`` and ``1 == true`` are false)."""
    ka, kb = kind(a), kind(b)
    if ka != kb:
        return False
    if ka in ("null", "bool", "number", "string", "list"):
        return a == b
    if ka == "map":
        return dict(a) == dict(b)
    return a is b


def _order(op: str, a: Any, b: Any) -> bool:
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


# ---------------------------------------------------------------------------------------------
# Evaluator

class Evaluator:
    """Evaluates ASTs over a scope; each rules engine subclasses it and sets the hooks below."""

    # receiver kind ("string", "list", "map") -> names from BUILTINS this language has
    methods: ClassVar[Mapping[str, frozenset[str]]] = {}
    int_division: ClassVar[bool] = False  # 7 / 2 == 3 (Storage's integers) rather than 3.5
    list_concat: ClassVar[bool] = False  # [1] + [2] == [1, 2]
    # Storage: an error on one side of && / || is forgiven when the other side decides on its own.
    forgiving_logic: ClassVar[bool] = False

    def __init__(self, scope: Scope):
        self.scope = scope

    def check(self, node: Node) -> bool:
        """True only if the expression evaluates to exactly ``true``; errors and non-booleans deny."""
        try:
            return self.evaluate(node) is True
        except (RuleError, RecursionError, OverflowError, ValueError, ZeroDivisionError, TypeError):
            return False  # a rule that cannot be evaluated grants nothing

    # ---- hooks ----------------------------------------------------------------------------------

    def lookup(self, obj: Mapping[str, Any], name: str) -> Any:
        """``map.name`` and ``map['name']``; a missing key is an error unless a dialect says null."""
        if name not in obj:
            raise RuleError(f"no field {name!r}")
        return obj[name]

    def attribute(self, obj: Any, name: str) -> Any:
        """``value.name`` on a value that is neither a map nor a :class:`Member`."""
        raise RuleError(f"cannot read {name!r} of {kind(obj)}")

    def call_function(self, name: str, args: list[Any], scope: Scope) -> Any:
        """``name(args)``: by default the name must hold a :class:`Method`."""
        return self.invoke(self.variable(name, scope), args)

    # ---- shared semantics -----------------------------------------------------------------------

    def variable(self, name: str, scope: Scope) -> Any:
        if name not in scope:
            raise RuleError(f"unknown variable {name!r}")
        return scope[name]

    def builtin(self, obj: Any, name: str) -> Method:
        receiver = kind(obj)
        if name in self.methods.get(receiver, ()):
            return Method(name, partial(BUILTINS[receiver][name], obj))
        raise RuleError(f"{receiver} has no method {name}()")

    def member(self, obj: Any, name: str) -> Any:
        if obj is None:
            raise RuleError(f"cannot read {name!r} of null")
        if isinstance(obj, Member):
            return obj.rule_member(name)
        if isinstance(obj, Mapping):
            return self.lookup(obj, name)
        return self.attribute(obj, name)

    def index(self, obj: Any, key: Any) -> Any:
        if isinstance(obj, Mapping) and isinstance(key, str):
            return self.lookup(obj, key)
        if isinstance(obj, list | tuple) and kind(key) == "number" and isinstance(key, int):
            if -len(obj) <= key < len(obj):
                return obj[key]
            raise RuleError("index out of range")
        if isinstance(obj, Member) and isinstance(key, str):
            return obj.rule_member(key)
        raise RuleError(f"cannot index {kind(obj)} with {kind(key)}")

    def call_method(self, obj: Any, name: str, args: list[Any]) -> Any:
        if obj is None:
            raise RuleError(f"cannot call {name}() on null")
        return self.invoke(obj.rule_member(name) if isinstance(obj, Member) else self.builtin(obj, name), args)

    def invoke(self, func: Any, args: list[Any]) -> Any:
        if not isinstance(func, Method):
            raise RuleError("not a function")
        try:
            return func.func(*args)
        except TypeError as exc:
            raise RuleError(f"{func.name}(): {exc}") from None

    def evaluate(self, node: Node, scope: Scope | None = None) -> Any:
        """Value of an expression; raises RuleError on any evaluation error."""
        scope = self.scope if scope is None else scope
        tag = node[0]
        if tag == "member":
            return self.member(self.evaluate(node[1], scope), node[2])
        if tag == "lit":
            return node[1]
        if tag == "name":
            return self.variable(node[1], scope)
        if tag == "bin":
            return self._binary(node[1], node[2], node[3], scope)
        if tag == "call":
            callee = node[1]
            if callee[0] == "member":
                obj = self.evaluate(callee[1], scope)
                return self.call_method(obj, callee[2], [self.evaluate(a, scope) for a in node[2]])
            return self.call_function(callee[1], [self.evaluate(a, scope) for a in node[2]], scope)
        if tag == "unary":
            value = self.evaluate(node[2], scope)
            return not _boolean(value, "!") if node[1] == "!" else -_need(value, "number", "unary -")
        if tag == "cond":
            test = _boolean(self.evaluate(node[1], scope), "a condition")
            return self.evaluate(node[2] if test else node[3], scope)
        if tag == "index":
            return self.index(self.evaluate(node[1], scope), self.evaluate(node[2], scope))
        if tag == "list":
            return [self.evaluate(item, scope) for item in node[1]]
        raise RuleError(f"unknown node {tag}")  # pragma: no cover

    def _binary(self, op: str, left: Node, right: Node, scope: Scope) -> Any:
        if op in ("&&", "||"):
            return self._logic(op, left, right, scope)
        a, b = self.evaluate(left, scope), self.evaluate(right, scope)
        if op in ("==", "==="):
            return equal(a, b)
        if op in ("!=", "!=="):
            return not equal(a, b)
        if op in ("<", "<=", ">", ">="):
            return _order(op, a, b)
        if op == "in":
            if kind(b) not in ("list", "map"):
                raise RuleError("the right side of 'in' must be a list or a map")
            try:
                return a in b
            except TypeError:
                raise RuleError(f"a {kind(a)} cannot be a map key") from None
        return self._arith(op, a, b)

    def _logic(self, op: str, left: Node, right: Node, scope: Scope) -> bool:
        decisive = op == "||"  # the value that decides the result on its own
        try:
            a = _boolean(self.evaluate(left, scope), op)
        except RuleError:
            if not self.forgiving_logic:
                raise
            if _boolean(self.evaluate(right, scope), op) is decisive:
                return decisive
            raise
        if a is decisive:
            return decisive
        return _boolean(self.evaluate(right, scope), op)

    def _arith(self, op: str, a: Any, b: Any) -> Any:
        ka, kb = kind(a), kind(b)
        if op == "+" and ka == kb and (ka == "string" or (ka == "list" and self.list_concat)):
            return a + b
        if ka != "number" or kb != "number":
            raise RuleError(f"{op} needs numbers, not {ka} and {kb}")
        if op == "+":
            return a + b
        if op == "-":
            return a - b
        if op == "*":
            return a * b
        if b == 0:
            raise RuleError("division by zero")
        if op == "%":
            return a % b
        if self.int_division and isinstance(a, int) and isinstance(b, int):
            quotient = abs(a) // abs(b)  # truncated toward zero, as CEL's integers
            return quotient if (a < 0) == (b < 0) else -quotient
        return a / b
