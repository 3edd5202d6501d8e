"""Which keys are secrets to take out of what we record and show.

A gateway a team runs itself (vLLM, a LiteLLM proxy without auth, Ollama) ignores the key,
and the key its clients are given is a placeholder: vLLM's docs use ``EMPTY``, others ``x``
or ``none``. Replacing every occurrence of such a word by ``[redacted]`` would rewrite the
model's answers (every ``x`` in every result) and garble messages, and hide nothing: a key
of a few characters protects nothing. A key shorter than ``MIN_SECRET_LENGTH`` is therefore
taken out only where it stands as a word of its own (``Bearer x``), and never out of answers.
"""

from __future__ import annotations

import base64
import functools
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from urllib.parse import quote, quote_plus, unquote, urlsplit

#: real provider keys are tens of characters long; shorter ones are placeholders
MIN_SECRET_LENGTH = 8

#: the length of a key's head that is redacted wherever it is quoted, even cut short there
#: (a message cut at a length, a URL parser quoting the part before a '/'): long enough to
#: be the key's own, not another word
MIN_HEAD_LENGTH = 16

#: characters of a word: a short key is redacted only where none of these touch it
_WORD_CHARACTERS = r"A-Za-z0-9_\-"


def is_placeholder(key: str) -> bool:
    return len(key) < MIN_SECRET_LENGTH


def redact_word(text: str, form: str, replacement: str) -> str:
    """``text`` with ``form`` replaced where it stands alone, not inside a longer word."""
    pattern = rf"(?<![{_WORD_CHARACTERS}]){re.escape(form)}(?![{_WORD_CHARACTERS}])"
    return re.sub(pattern, replacement, text)


@functools.lru_cache(maxsize=64)
def quoted_forms(secret: str) -> tuple[str, ...]:
    """``secret`` as it may be quoted in an error: raw; escaped as ``repr`` of its text or of
    its bytes shows it (h11's "Illegal header value b'…'" escapes a control character); as
    a JSON string holds it (a server quoting the request's headers as JSON, or JSON inside
    JSON, up to three escapes deep); and percent-encoded (a URL quoted with its query).
    Longest first, so a longer form is replaced before its parts."""
    if not secret:
        return ()
    forms = {secret}
    for _ in range(3):  # escapes of escapes: JSON quoted in JSON in a JSON answer
        forms |= {escaped for form in forms for escaped in _escaped(form)}
    return tuple(sorted(forms, key=len, reverse=True))


def _escaped(text: str) -> set[str]:
    return {
        repr(text)[1:-1],
        text.encode("unicode_escape").decode("ascii"),
        repr(text.encode("utf-8", "surrogateescape"))[2:-1],
        repr(text.encode("latin-1", "replace"))[2:-1],
        json.dumps(text)[1:-1],
        json.dumps(text, ensure_ascii=False)[1:-1],
        quote(text, safe=""),
        quote_plus(text, safe=""),
    }


def byte_forms(secrets: Iterable[str]) -> tuple[bytes, ...]:
    """Every ``quoted_forms`` of each of ``secrets`` but a placeholder's (never taken out of
    answers: ``is_placeholder``), as bytes, longest first: what the providers take out of a
    downloaded file and the engine out of an upstream's answer."""
    forms = {
        form.encode("utf-8", "surrogateescape")
        for secret in secrets
        if secret and not is_placeholder(secret)
        for form in quoted_forms(secret)
    }
    return tuple(sorted(forms, key=len, reverse=True))


@dataclass(frozen=True)
class Credentials:
    """What the user info of URLs (``http://user:password@host``) makes secret.

    ``passwords`` (as written and percent-decoded) are taken out of messages only: a password
    may be an ordinary word that a model's answer holds, and it is never sent as it is.
    ``tokens``, the ``Basic`` tokens HTTP sends them in (``Authorization``,
    ``Proxy-Authorization``), are taken out of everything, answers included: a server or
    proxy that quotes the request's headers quotes those."""

    passwords: tuple[str, ...] = ()
    tokens: tuple[str, ...] = ()

    def __add__(self, other: Credentials) -> Credentials:
        return Credentials(
            tuple(dict.fromkeys((*self.passwords, *other.passwords))),
            tuple(dict.fromkeys((*self.tokens, *other.tokens))),
        )

    @property
    def all(self) -> tuple[str, ...]:
        return (*self.passwords, *self.tokens)


def url_credentials(url: str) -> Credentials:
    """The ``Credentials`` of ``url``'s user info; empty without a password."""
    if "://" not in url:
        url = f"http://{url}"
    try:
        parts = urlsplit(url)
        username, password = parts.username, parts.password
    except ValueError:  # a port that is not a number: nothing is sent with it
        return Credentials()
    if not password:
        return Credentials()
    pair = f"{unquote(username or '')}:{unquote(password)}".encode("utf-8", "surrogateescape")
    token = base64.b64encode(pair).decode("ascii")
    return Credentials(tuple(dict.fromkeys((password, unquote(password)))), (token,))


def proxy_credentials(environ: Mapping[str, str]) -> Credentials:
    """The ``url_credentials`` of every proxy the environment names (``HTTP_PROXY``,
    ``HTTPS_PROXY``, ``ALL_PROXY``, in either case): sent to the proxy as
    ``Proxy-Authorization``, which a proxy refusing with a 407 may quote back."""
    found = Credentials()
    for name, value in environ.items():
        if name.lower() in ("http_proxy", "https_proxy", "all_proxy") and value:
            found += url_credentials(value)
    return found


def redact_heads(text: str, secret: str, replacement: str) -> str:
    """``text`` with every run that starts with ``secret``'s first ``MIN_HEAD_LENGTH``
    characters replaced, as far as it goes on matching ``secret``: the key quoted cut short
    (its tail lost to a length limit or a parser) is still the key's. A secret no longer
    than the head is left to the whole-form redaction."""
    if len(secret) <= MIN_HEAD_LENGTH:
        return text
    head = secret[:MIN_HEAD_LENGTH]
    start = text.find(head)
    while start != -1:
        end = start + MIN_HEAD_LENGTH
        while end < len(text) and end - start < len(secret) and text[end] == secret[end - start]:
            end += 1
        text = text[:start] + replacement + text[end:]
        start = text.find(head, start + len(replacement))
    return text
