"""What a JSON schema for structured output may ask, before xgrammar compiles it: the schema rewritten where
xgrammar would get it wrong, refused where the answer could not be held to it, and priced by what its grammar
costs to compile.

- A string's ``minLength``/``maxLength`` becomes a ``pattern`` of as many characters. xgrammar (0.2.9) compiles
  a length-bounded string to a bare character class that lets raw control characters through and no escapes
  (mlc-ai/xgrammar#800, fix pending in #880): the answer is then not JSON. Its pattern path is JSON-string aware,
  and a pattern counts decoded characters, as maxLength does.
- Compile time grows with the square of each counted repeat the grammar unrolls (a length, a pattern's
  ``{m,n}``): ``maxLength`` 2,000 compiles in ~2-6 s on two cores, 8,000 in ~2 minutes. The sum of the squares
  is held to one string of MAX_REPEAT characters (or 4 of half that, 400 of a twentieth).
- Keywords xgrammar compiles without enforcing (checked: an answer breaking them is accepted) are refused, as are
  patterns with lookarounds or backreferences and non-local ``$ref``; ``oneOf`` is read as ``anyOf`` (exact for
  disjoint branches, as pydantic's discriminated unions are), and an ``allOf`` of one schema as that schema.
"""

from __future__ import annotations

import json
import re
import re._parser as regex_parser  # Python's own regex parser: the shape of a pattern, to price it
from typing import Any

from app.errors import InvalidRequestError

MAX_REPEAT = 2_000
MAX_REPEAT_COST = MAX_REPEAT ** 2
# Keywords whose values are data, not schemas (never rewritten, refused or priced); keys starting "x-" too.
DATA_KEYWORDS = frozenset({"const", "enum", "default", "examples", "discriminator"})
# Keywords whose values map names to schemas: the names are not keywords.
NAMED_SCHEMAS = frozenset({"properties", "$defs", "definitions", "patternProperties"})
UNENFORCED = {
    "not": "not", "contains": "contains (and minContains/maxContains)",
    "uniqueItems": "uniqueItems (a set: use a list)",
    "if": "if/then/else", "then": "if/then/else", "else": "if/then/else",
    "dependentRequired": "dependentRequired", "dependentSchemas": "dependentSchemas",
}
STRING_KEYWORDS = ("minLength", "maxLength", "pattern", "format")
_COUNTED_REPEAT = re.compile(r"\{(\d+)(?:,(\d*))?\}")


class GrammarError(InvalidRequestError):
    """The schema cannot be used: a 400 saying why, naming ``param`` (the request's field; Grammars.compile and the
    matcher fill it in)."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message, param=param)


def prepared_schema(schema: Any) -> tuple[Any, int]:
    """(the schema as xgrammar is to get it, what its grammar costs to compile); GrammarError if refused."""
    cost = [0]
    rewritten = _walk(schema, cost)
    if cost[0] > MAX_REPEAT_COST:
        raise GrammarError(f"the JSON schema's string lengths and pattern repeats unroll to more than one string of "
                           f"{MAX_REPEAT} characters would (its grammar would take minutes to compile): make the "
                           "bounds smaller or fewer")
    return rewritten, cost[0]


def _walk(node: Any, cost: list[int]) -> Any:
    if isinstance(node, list):
        return [_walk(item, cost) for item in node]
    if not isinstance(node, dict):
        return node
    node = _plain(node)
    for keyword, said in UNENFORCED.items():  # after _plain: an allOf's one schema is this node now
        if keyword in node and not (keyword == "uniqueItems" and node[keyword] is False):
            raise GrammarError(f"the JSON schema uses {said}, which the grammar cannot enforce")
    rewritten = {}
    for key, value in node.items():
        if key in DATA_KEYWORDS or key.startswith("x-"):
            rewritten[key] = value
        elif key in NAMED_SCHEMAS and isinstance(value, dict):
            if key == "patternProperties":  # its names are patterns xgrammar compiles too
                cost[0] += sum(pattern_size(name) ** 2 for name in value)
            rewritten[key] = {name: _walk(sub, cost) for name, sub in value.items()}
        else:
            rewritten[key] = _walk(value, cost)
    if rewritten.get("type") == "string":
        _string_bounds(rewritten)
    elif "minLength" in rewritten or "maxLength" in rewritten:  # no type: they would bind nothing the grammar sees
        raise GrammarError("minLength/maxLength without \"type\": \"string\": say the type")
    if isinstance(rewritten.get("pattern"), str):
        _check_pattern(rewritten["pattern"])
        cost[0] += pattern_size(rewritten["pattern"]) ** 2
    return rewritten


def _plain(node: dict[str, Any]) -> dict[str, Any]:
    """The forms xgrammar would read wrongly, said plainly: a type list holding "string" with string keywords as
    anyOf (the string branch then gets its bounds as a pattern), oneOf as anyOf, an allOf of one as that one;
    a larger allOf, a required name the object does not declare, and a non-local $ref refused."""
    while "allOf" in node:  # an allOf of one schema is that schema (pydantic wraps a $ref so), nested ones too
        parts = node["allOf"]
        if not isinstance(parts, list) or len(parts) != 1 or not isinstance(parts[0], dict) \
                or set(parts[0]) & (set(node) - {"allOf"}):
            raise GrammarError("the JSON schema uses allOf, which the grammar cannot enforce (beyond one schema)")
        node = {**{key: value for key, value in node.items() if key != "allOf"}, **parts[0]}
    types = node.get("type")
    if isinstance(types, list) and "string" in types and any(key in node for key in STRING_KEYWORDS):
        common = {key: value for key, value in node.items() if key != "type" and key not in STRING_KEYWORDS}
        string = {**common, "type": "string", **{key: node[key] for key in STRING_KEYWORDS if key in node}}
        others = [kind for kind in types if kind != "string"]
        node = {"anyOf": [string, {**common, "type": others if len(others) != 1 else others[0]}]} if others else string
    if "oneOf" in node and "anyOf" not in node:
        node = {("anyOf" if key == "oneOf" else key): value for key, value in node.items()}
    required, declared = node.get("required"), node.get("properties")
    if isinstance(required, list) and required:
        missing = [name for name in required if not isinstance(declared, dict) or name not in declared]
        if missing:
            raise GrammarError(f"required names {', '.join(map(str, missing[:5]))}, which the schema's properties "
                               "do not declare: the grammar cannot enforce that")
    reference = node.get("$ref")
    if isinstance(reference, str) and not reference.startswith("#"):
        raise GrammarError(f"$ref {reference[:80]!r} is not in the schema: only local references (#/...) are read")
    return node


def _check_pattern(pattern: str) -> None:
    try:
        parsed = regex_parser.parse(pattern)
    except Exception:  # noqa: BLE001 - another dialect, or invalid: xgrammar judges
        return
    if _uses(parsed, ("ASSERT", "ASSERT_NOT", "GROUPREF", "GROUPREF_EXISTS")):
        raise GrammarError(f"the pattern {pattern[:80]!r} uses a lookaround or a backreference, which the grammar "
                           "cannot enforce")


def _uses(items: Any, names: tuple[str, ...]) -> bool:
    for op, value in items:
        if str(op) in names:
            return True
        inner = (value[-1] if str(op) in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT", "SUBPATTERN")
                 else value[1] if str(op) == "BRANCH" else value if str(op) == "ATOMIC_GROUP" else None)
        branches = inner if str(op) == "BRANCH" else [inner] if inner is not None else []
        if any(_uses(branch, names) for branch in branches):
            return True
    return False


def _string_bounds(schema: dict[str, Any]) -> None:
    """A string's length bounds as a pattern, in place (see the module's doc)."""
    if "minLength" not in schema and "maxLength" not in schema or {"enum", "const"} & schema.keys():
        return
    if "format" in schema:
        raise GrammarError("a string with both a format and minLength/maxLength: the grammar enforces only the "
                           "format; drop the length")
    low = _length(schema.pop("minLength", 0), "minLength")
    high = _length(schema.pop("maxLength"), "maxLength") if "maxLength" in schema else None
    for name, bound in (("minLength", low), ("maxLength", high)):  # before a pattern of it is even parsed
        if bound is not None and bound > MAX_REPEAT:
            raise GrammarError(f"{name} {bound} is over {MAX_REPEAT}: a grammar for it would take minutes to compile "
                               "(drop the bound or make it smaller)")
    pattern = schema.get("pattern")
    if pattern is None:
        schema["pattern"] = f"^[\\s\\S]{{{low},{'' if high is None else high}}}$"
        return
    # Both: the grammar enforces the pattern only. Fine where the pattern already keeps within the lengths
    # (pydantic's Field(pattern="^[A-Z]{3}$", max_length=3)); otherwise the length would go unchecked.
    width = pattern_width(pattern) if isinstance(pattern, str) else None
    if width is None or width[0] < low or (high is not None and width[1] > high):
        raise GrammarError("a string with both a pattern and minLength/maxLength the pattern does not keep to: the "
                           "grammar enforces only the pattern; say the length in it (e.g. ^[a-z]{1,20}$)")


def _length(value: Any, name: str) -> int:
    if isinstance(value, float) and value.is_integer():  # JSON Schema counts 5.0 as an integer
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise GrammarError(f"{name} must be a non-negative integer, not {json.dumps(value)[:40]}")
    return value


def pattern_width(pattern: str) -> tuple[int, int] | None:
    """(fewest, most) characters ``pattern`` matches whole; None when Python's parser does not read it."""
    try:
        return regex_parser.parse(pattern).getwidth()
    except Exception:  # noqa: BLE001 - a dialect Python does not read, or an invalid pattern
        return None


def pattern_size(pattern: str) -> int:
    """How many character steps ``pattern`` unrolls to: a counted repeat multiplies what it repeats by its bound
    (an open one by its minimum), alternatives add. A pattern Python's parser does not read (another dialect, or
    a bound past its limits) is priced as if its counted repeats were all nested: never below what it costs."""
    try:
        return _parsed_size(regex_parser.parse(pattern))
    except Exception:  # noqa: BLE001 - priced from its text instead; xgrammar judges whether it is valid
        size = max(len(pattern), 1)
        for low, high in _COUNTED_REPEAT.findall(pattern):
            size *= max(int(low), int(high or 0), 1)
        return size


def _parsed_size(items: Any) -> int:
    total = 0
    for op, value in items:
        name = str(op)
        if name in ("MAX_REPEAT", "MIN_REPEAT", "POSSESSIVE_REPEAT"):
            low, high, inner = value
            bound = high if high != regex_parser.MAXREPEAT else max(low, 1)
            total += bound * _parsed_size(inner)
        elif name == "SUBPATTERN":
            total += _parsed_size(value[-1])
        elif name == "BRANCH":
            total += sum(_parsed_size(branch) for branch in value[1])
        elif name == "ATOMIC_GROUP":
            total += _parsed_size(value)
        elif name in ("ASSERT", "ASSERT_NOT"):
            total += _parsed_size(value[1])
        elif name != "AT":  # an anchor matches no character
            total += 1
    return total
