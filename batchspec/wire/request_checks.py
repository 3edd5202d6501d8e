"""What every provider refuses in an OpenAI-format request body, checked once for all dialects.

Pure functions, standard library only. ``batchspec.wire.inputs`` calls them on OpenAI, Azure,
Mistral, ... lines, and ``anthropic_lines`` / ``gemini_lines`` call them while converting a
chat line, so a line is refused with the same code and message whichever provider it is for,
before its upload, rather than by the provider after the batch ran (that request failed for
good, to be fixed and sent again in another batch).

Rules, each ``(code, message)``, the message naming the field (``body.messages[0].role``):

``invalid_message``     a ``messages`` entry that is not an object.
``missing_role``        a message without ``role`` (or with a null one).
``invalid_role``        a ``role`` that is not one of ``CHAT_ROLES``, OpenAI's set. A role
                        OpenAI knows but another dialect cannot express (``function`` for
                        Anthropic) is that dialect's own ``unmappable_parameter``.
``invalid_max_tokens``  an output-token limit (``OUTPUT_LIMIT_KEYS``: ``max_tokens``,
                        ``max_completion_tokens``, ``max_output_tokens``) that is set (not
                        null) and is not a JSON integer >= 1: ``0``, ``-5``, ``1.5``,
                        ``100.0``, ``"100"`` and ``true`` are all refused.

``streamed_request``    ``stream`` set to anything but ``false`` (or null): a batched request
                        is answered whole, in the output file; none of the Batch APIs streams.
``invalid_parameter``   a sampling parameter of the wrong JSON type: ``temperature``,
                        ``top_p``, ``presence_penalty``, ``frequency_penalty`` not a number
                        (``"hot"``, ``true``), ``n`` or ``seed`` not an integer (``2.0``
                        too, as for a limit), or out of the range every OpenAI-compatible API
                        takes: ``temperature`` below 0 (the upper bound differs: OpenAI 2,
                        vLLM none), ``top_p`` outside 0 to 1, ``n`` below 1, a penalty outside
                        -2 to 2. Not checked with ``params=False`` (the ``local`` provider,
                        whose model servers are the user's own: some read ``"0.5"``).

Null is "not set" for each of them. Nothing else of a message is looked at here: content
shapes (parts, tool calls) vary by provider and are the dialects' business. Only the first bad
message of a body is reported, so one long conversation cannot flood the report. The checks
are a type test and a set lookup per message or key (a body that sets none of the sampling
parameters costs one set test): the scan runs them on every line of inputs of many thousands
of lines.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from batchspec.wire.chat_convert import short

#: the roles OpenAI's chat completions accept, in the order its error message lists them
CHAT_ROLES_IN_ORDER = ("system", "developer", "user", "assistant", "tool", "function")
CHAT_ROLES = frozenset(CHAT_ROLES_IN_ORDER)
#: the request parameters that bound a request's output tokens (``wire.usage`` reads them)
OUTPUT_LIMIT_KEYS = ("max_tokens", "max_completion_tokens", "max_output_tokens")

#: the codes of the problems found here
REQUEST_CHECK_CODES = frozenset(
    {
        "invalid_message",
        "missing_role",
        "invalid_role",
        "invalid_max_tokens",
        "streamed_request",
        "invalid_parameter",
    }
)
#: the sampling parameters checked: (kind, lowest, highest), None where unbounded
_SAMPLING: dict[str, tuple[str, float | None, float | None]] = {
    "temperature": ("number", 0, None),
    "top_p": ("number", 0, 1),
    "presence_penalty": ("number", -2, 2),
    "frequency_penalty": ("number", -2, 2),
    "n": ("integer", 1, None),
    "seed": ("integer", None, None),
}
_CHECKED_KEYS = frozenset({"stream", *_SAMPLING})

_ROLES_SHOWN = ", ".join(CHAT_ROLES_IN_ORDER)


def first_message_problem(
    messages: list[Any], where: str = "body.messages"
) -> tuple[str, str] | None:
    """``(code, message)`` for the first entry of ``messages`` that is not an object with an
    OpenAI role, or None when every one is (see the module docstring)."""
    for message in messages:  # the common case: a dict whose role is a known str, nothing else
        # (a role that is not a str never reaches the set: a list there is unhashable)
        if type(message) is not dict:
            break
        role = message.get("role")
        if type(role) is not str or role not in CHAT_ROLES:
            break
    else:
        return None
    for index, message in enumerate(messages):  # something is wrong: find and name it
        if not isinstance(message, Mapping):
            return (
                "invalid_message",
                f"{where}[{index}] must be an object, not a {json_type(message)}",
            )
        role = message.get("role")
        if role is None:
            return (
                "missing_role",
                f"{where}[{index}].role is missing; it must be one of {_ROLES_SHOWN}",
            )
        if not (isinstance(role, str) and role in CHAT_ROLES):
            return (
                "invalid_role",
                f"{where}[{index}].role {short(role)} is not one of {_ROLES_SHOWN}",
            )
    return None


def output_limit_problem(
    body: Mapping[str, Any], keys: tuple[str, ...] = OUTPUT_LIMIT_KEYS, where: str = "body"
) -> tuple[str, str] | None:
    """``(code, message)`` for the first of ``keys`` set in ``body`` to anything but an
    integer >= 1 (null counts as not set), or None."""
    for key in keys:
        value = body.get(key)
        if value is None or (type(value) is int and value >= 1):  # bool is not int here
            continue
        return (
            "invalid_max_tokens",
            f"{where}.{key} {short(value)} is not an integer >= 1",
        )
    return None


def sampling_problem(
    body: Mapping[str, Any], *, params: bool = True, where: str = "body"
) -> tuple[str, str] | None:
    """``(code, message)`` for a ``stream`` that asks for streaming, or (with ``params``) the
    first sampling parameter of the wrong type or out of range, or None (see the module
    docstring)."""
    if _CHECKED_KEYS.isdisjoint(body):  # the common case: a set test in C, nothing else
        return None
    stream = body.get("stream")
    if stream is not None and stream is not False:
        return (
            "streamed_request",
            f"{where}.stream {short(stream)}: a batched request is not streamed (its answer "
            "is written whole to the output file); leave stream out",
        )
    if not params:
        return None
    for key, (kind, lowest, highest) in _SAMPLING.items():
        value = body.get(key)
        if value is None:
            continue
        typed = type(value) is int or (kind == "number" and type(value) is float)
        if typed and (lowest is None or value >= lowest) and (highest is None or value <= highest):
            continue
        what = "an integer" if kind == "integer" else "a number"
        if lowest is not None and highest is not None:
            what = f"{what} from {lowest:g} to {highest:g}"
        elif lowest is not None:
            what = f"{what} >= {lowest:g}"
        return ("invalid_parameter", f"{where}.{key} {short(value)} is not {what}")
    return None


def json_type(value: Any) -> str:
    """The JSON type of a parsed value, as messages name it (``string``, ``array``, ...)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


__all__ = [
    "CHAT_ROLES",
    "CHAT_ROLES_IN_ORDER",
    "OUTPUT_LIMIT_KEYS",
    "REQUEST_CHECK_CODES",
    "json_type",
    "first_message_problem",
    "output_limit_problem",
    "sampling_problem",
]
