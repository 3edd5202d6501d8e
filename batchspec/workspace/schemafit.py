"""The happy path of the schema checks: says a document is valid without importing jsonschema.

``schema_accepts(schema, instance)`` is True only when ``Draft202012Validator(schema)
.iter_errors(instance)`` would yield nothing; False means "not sure it is": the caller then
asks jsonschema, which finds the errors and words them. So a clean manifest or project file
costs a walk of its few keys (jsonschema's generic ``iter_errors`` took ~0.6 ms a manifest,
and ~50 ms to import) and a broken one gets exactly the messages it always got.

Promises (``tests/test_schemafit.py`` checks them against jsonschema on a table of documents):

* **Never valid where jsonschema finds an error.** Each keyword is checked as jsonschema's
  Draft 2020-12 validator checks it (the same comparisons, so NaN and ``1.0`` as an integer
  come out as they do there). A schema using a keyword not reproduced here is not compiled:
  every document then goes to jsonschema.
* **Sure or silent.** A value of a type YAML or JSON does not give plainly (a date, a dict
  subclass, a bytes value), a uniqueness check over anything but strings, raise ``_Unsure``
  inside and come out False: jsonschema decides.

The compiled checkers are cached per schema object (the schemas are loaded once per process).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sized
from typing import Any

#: keywords that annotate and never fail a document (Draft 2020-12 without a format checker)
_ANNOTATIONS = frozenset(
    {"$schema", "$id", "$comment", "$defs", "title", "description", "default", "examples"}
)
#: the types a YAML or JSON document gives plainly; anything else is left to jsonschema
_PLAIN = frozenset({dict, list, str, int, float, bool, type(None)})

Check = Callable[[Any], bool]


class UnsupportedSchema(Exception):
    """The schema uses something this checker does not reproduce exactly."""


class _Unsure(Exception):
    """A value this checker cannot judge exactly as jsonschema would."""


def schema_accepts(schema: Mapping[str, Any], instance: Any) -> bool:
    """True only if jsonschema would find no error in ``instance`` under ``schema``."""
    check = _compiled(schema)
    if check is None:
        return False
    try:
        return check(instance)
    except (_Unsure, RecursionError):
        return False


_CACHE: dict[int, tuple[Mapping[str, Any], Check | None]] = {}


def _compiled(schema: Mapping[str, Any]) -> Check | None:
    held = _CACHE.get(id(schema))
    if held is not None and held[0] is schema:
        return held[1]
    try:
        check: Check | None = compile_schema(schema)
    except UnsupportedSchema:
        check = None
    _CACHE[id(schema)] = (schema, check)
    return check


def compile_schema(root: Mapping[str, Any]) -> Check:
    """A checker of ``root``; ``UnsupportedSchema`` if any part of it is not reproduced."""
    refs: dict[str, Check] = {}

    def ref(target: str) -> Check:
        if target not in refs:
            refs[target] = _unsupported_check  # replaced below; a cycle reaches it lazily
            refs[target] = node(_resolve(root, target))
        return lambda value: refs[target](value)

    def node(schema: Any) -> Check:
        if schema is True:
            return _always
        if schema is False:
            return _never
        if not isinstance(schema, Mapping):
            raise UnsupportedSchema(f"a schema must be an object or a boolean: {schema!r}")
        checks = [c for c in (_keyword(schema, key, node, ref) for key in schema) if c]
        checks.extend(_if_then_else(schema, node))
        return _all_of_checks(checks)

    return node(root)


def _keyword(
    schema: Mapping[str, Any],
    key: str,
    node: Callable[[Any], Check],
    ref: Callable[[str], Check],
) -> Check | None:
    """The check of one keyword of ``schema`` (None: it never fails a document)."""
    value = schema[key]
    if key in _ANNOTATIONS or key in ("if", "then", "else"):
        return None
    if key == "$ref":
        return ref(value)
    if key == "type":
        return _type_check(value)
    if key in ("const", "enum"):
        return _equality_check(key, value)
    if key in ("properties", "additionalProperties", "required", "propertyNames"):
        return _object_check(schema, key, node)
    if key in ("minProperties", "maxProperties"):
        return _size_check(dict, key.startswith("min"), value)
    if key in ("minItems", "maxItems"):
        return _size_check(list, key.startswith("min"), value)
    if key in ("minLength", "maxLength"):
        return _size_check(str, key.startswith("min"), value)
    if key == "items":
        item = node(value)
        return lambda v: type(v) is not list or all(item(x) for x in v)
    if key == "uniqueItems":
        return _unique_items if value is True else None
    if key == "pattern":
        search = re.compile(value).search  # jsonschema: re.search(pattern, instance)
        return lambda v: type(v) is not str or search(v) is not None
    if key in _BOUNDS:
        return _bound_check(key, value)
    if key in ("allOf", "anyOf", "oneOf", "not"):
        return _combinator(key, value, node)
    raise UnsupportedSchema(f"keyword {key!r} is left to jsonschema")


def _unsupported_check(value: Any) -> bool:
    raise _Unsure


def _always(value: Any) -> bool:
    _plain(value)
    return True


def _never(value: Any) -> bool:
    return False


def _plain(value: Any) -> None:
    if type(value) not in _PLAIN:
        raise _Unsure


def _all_of_checks(checks: list[Check]) -> Check:
    def check(value: Any) -> bool:
        if type(value) not in _PLAIN:
            raise _Unsure
        for c in checks:  # noqa: SIM110 - a loop, not all(<generator>): ~40 calls a manifest
            if not c(value):
                return False
        return True

    return check


def _resolve(root: Mapping[str, Any], target: str) -> Any:
    """A local ``$ref`` (``#`` or ``#/a/b``) inside ``root``."""
    if target == "#":
        return root
    if not target.startswith("#/"):
        raise UnsupportedSchema(f"$ref {target!r} is not local")
    found: Any = root
    for token in target[2:].split("/"):
        token = token.replace("~1", "/").replace("~0", "~")
        if not isinstance(found, Mapping) or token not in found:
            raise UnsupportedSchema(f"$ref {target!r} does not resolve")
        found = found[token]
    return found


_TYPES = ("object", "array", "string", "boolean", "null", "number", "integer")


#: the Python types jsonschema's Draft 2020-12 type checker accepts for each name, but
#: ``integer``, which also takes a float with no fractional part (1.0 is an integer in 2020-12)
_TYPE_KINDS: dict[str, frozenset[type]] = {
    "object": frozenset({dict}),
    "array": frozenset({list}),
    "string": frozenset({str}),
    "boolean": frozenset({bool}),
    "null": frozenset({type(None)}),
    "number": frozenset({int, float}),
    "integer": frozenset({int}),
}


def _type_check(value: Any) -> Check:
    """Whether a value is of one of the type names ``value`` gives, as one set lookup by
    ``type(v)`` (``bool`` is no ``integer``: ``type(True)`` is not ``int``)."""
    names = [value] if isinstance(value, str) else list(value)
    if not names or any(name not in _TYPES for name in names):
        raise UnsupportedSchema(f"type {value!r}")
    kinds = frozenset().union(*(_TYPE_KINDS[name] for name in names))
    if "integer" in names and float not in kinds:
        return lambda v: type(v) in kinds or (type(v) is float and v.is_integer())
    return lambda v: type(v) in kinds


def _equality_check(key: str, value: Any) -> Check:
    """``const``/``enum`` of strings only: jsonschema's equality of a string with anything
    is ``==`` when both are strings, and false otherwise."""
    allowed = [value] if key == "const" else value
    if not isinstance(allowed, list) or not all(type(a) is str for a in allowed):
        raise UnsupportedSchema(f"{key} of other values than strings")
    members = frozenset(allowed)
    return lambda v: type(v) is str and v in members


def _object_check(schema: Mapping[str, Any], key: str, node: Callable[[Any], Check]) -> Check:
    if key == "required":
        names = list(schema[key])
        return lambda v: type(v) is not dict or all(name in v for name in names)
    if key == "propertyNames":
        check_name = node(schema[key])
        return lambda v: type(v) is not dict or all(check_name(name) for name in v)
    if key == "properties":
        children = {name: node(sub) for name, sub in schema[key].items()}

        def check_properties(v: Any) -> bool:
            # over the document's keys (a manifest sets a few of the many the schema knows)
            if type(v) is dict:
                for name, item in v.items():
                    c = children.get(name)
                    if c is not None and not c(item):
                        return False
            return True

        return check_properties
    if "patternProperties" in schema:  # additionalProperties would depend on it
        raise UnsupportedSchema("patternProperties")
    known = frozenset(schema.get("properties", {}))
    extra = schema[key]
    if extra is False:
        return lambda v: type(v) is not dict or all(name in known for name in v)
    check_extra = node(extra)
    return lambda v: (
        type(v) is not dict
        or all(check_extra(item) for name, item in v.items() if name not in known)
    )


def _size_check(kind: type[Sized], at_least: bool, limit: Any) -> Check:
    if type(limit) is not int:
        raise UnsupportedSchema(f"a size limit that is not an integer: {limit!r}")
    if at_least:
        return lambda v: type(v) is not kind or len(v) >= limit
    return lambda v: type(v) is not kind or len(v) <= limit


def _unique_items(value: Any) -> bool:
    if type(value) is not list or len(value) < 2:
        return True
    if not all(type(item) is str for item in value):
        raise _Unsure  # jsonschema's equality across types (1 == 1.0, True != 1): left to it
    return len(set(value)) == len(value)


#: jsonschema fails a number when this comparison with the bound is true
_BOUNDS: dict[str, Callable[[Any, Any], bool]] = {
    "minimum": lambda v, bound: v < bound,
    "maximum": lambda v, bound: v > bound,
    "exclusiveMinimum": lambda v, bound: v <= bound,
    "exclusiveMaximum": lambda v, bound: v >= bound,
}


def _bound_check(key: str, bound: Any) -> Check:
    if type(bound) not in (int, float) or not math.isfinite(bound):
        raise UnsupportedSchema(f"{key} {bound!r}")
    fails = _BOUNDS[key]

    def check(v: Any) -> bool:
        kind = type(v)
        return (kind is not int and kind is not float) or not fails(v, bound)

    return check


def _combinator(key: str, value: Any, node: Callable[[Any], Check]) -> Check:
    if key == "not":
        inner = node(value)
        return lambda v: not inner(v)
    if not isinstance(value, list) or not value:
        raise UnsupportedSchema(f"{key} needs a non-empty list")
    parts = [node(sub) for sub in value]
    if key == "allOf":
        return lambda v: all(p(v) for p in parts)
    if key == "anyOf":
        return lambda v: any(p(v) for p in parts)
    return lambda v: sum(1 for p in parts if p(v)) == 1


def _if_then_else(schema: Mapping[str, Any], node: Callable[[Any], Check]) -> list[Check]:
    if "if" not in schema:
        return []
    condition = node(schema["if"])
    then = node(schema["then"]) if "then" in schema else _always
    otherwise = node(schema["else"]) if "else" in schema else _always
    return [lambda v: then(v) if condition(v) else otherwise(v)]
