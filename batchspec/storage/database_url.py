"""Database URLs (``postgresql://user:password@host:port/dbname?options``): recognising them,
and keeping their passwords out of every message.

Promises:

* ``is_database_url`` is true only for the schemes batchspec can open (``postgresql://``,
  ``postgres://``); anything else given as a state location is a path to an SQLite file.
* ``redact_url`` shows a URL with its password replaced by ``***`` (user, host, port,
  database and options stay, so the message still says which database); a URL that cannot
  be parsed is shown as ``<scheme>://***`` rather than risk printing what it holds.
* ``scrub`` removes a URL's password (raw and percent-encoded) from any text, such as a
  driver's error message, before it reaches a user.
* ``misencoded`` says when libpq would cut a URL elsewhere than its author meant (an ``@`` or
  ``/`` left unencoded in the password), so the URL is refused before the driver sends part of
  the password as a host, port or database name (which a message would then print).
"""

from __future__ import annotations

import re
from urllib.parse import quote, unquote, urlsplit, urlunsplit

DATABASE_SCHEMES = ("postgresql", "postgres")
REDACTED = "***"


def is_database_url(text: str | object) -> bool:
    """Whether ``text`` is a database URL batchspec can open (not a path)."""
    if not isinstance(text, str):
        return False
    scheme, sep, _ = text.partition("://")
    return bool(sep) and scheme.lower() in DATABASE_SCHEMES


def _credentials(url: str) -> tuple[str, str, str | None, str]:
    """``(scheme, user, password or None, after)``: the URL split at its credentials as libpq
    reads them, ``after`` being what follows the ``@`` (or everything after ``scheme://``).

    The credentials run to the *last* ``@``, so a password left unencoded with an ``@``, ``/``,
    ``?`` or ``#`` in it (``urlsplit`` would cut it into path, query or fragment) is still
    found whole and hidden whole. libpq reads ``?`` and ``#`` there as part of the password, but
    stops at the first ``@`` or ``/``: ``misencoded`` refuses those URLs. An ``@`` left
    unencoded in the query makes this take too much as the password, which only hides more.
    """
    scheme, _, rest = url.partition("://")
    at = rest.rfind("@")
    if at < 0:
        return scheme, "", None, rest
    user, colon, password = rest[:at].partition(":")
    return scheme, user, password if colon else None, rest[at + 1 :]


def _is_password_key(pair: str) -> bool:
    return pair.partition("=")[0].strip().lower() == "password"


def url_password(url: str) -> str | None:
    """The password in ``url`` (decoded), or None; also finds ``password=`` in the query."""
    _, _, password, after = _credentials(url)
    if password:
        return unquote(password)
    for pair in after.partition("?")[2].split("#")[0].split("&"):
        key, _, value = pair.partition("=")
        if _is_password_key(key) and value:
            return unquote(value)
    return None


def misencoded(url: str) -> str | None:
    """Why libpq would not read ``url`` as written, or None.

    libpq takes the credentials to end at the first ``@`` and the host to start after it, and
    takes a ``/`` before any ``@`` to end the host. So a password with an unencoded ``@``
    (``u:p@ss@host``) sends the rest of the password as the host name, and one with an
    unencoded ``/`` (``u:pa/ss@host``, as base64 passwords have) sends the user as the host, a
    piece of the password as the port and the rest as the database: the connection fails and
    the driver's message names those pieces. An ``@`` in the database name
    (``host:5432/my@db``) looks the same as the second case and needs ``%40`` too.
    """
    rest = url.partition("://")[2]
    cut = min((i for i in (rest.find("@"), rest.find("/")) if i >= 0), default=-1)
    if cut < 0:
        return None
    if rest[cut] == "@":
        host = re.split(r"[/?]", rest[cut + 1 :], maxsplit=1)[0]
        if "@" not in host:
            return None
    elif ":" not in rest[:cut] or "@" not in rest[cut + 1 :].partition("?")[0]:
        return None
    return (
        "an '@' or '/' in its password (or user name, or database name) is not percent-encoded, "
        "so the driver would take part of the password for the host, port or database; write "
        "'@' as %40 and '/' as %2F (python3 -c 'import sys, urllib.parse; "
        'print(urllib.parse.quote(sys.argv[1], safe=""))\' PASSWORD prints it encoded)'
    )


def redact_url(url: str) -> str:
    """``url`` with its password shown as ``***``; fit for messages and logs."""
    try:
        scheme, user, password, after = _credentials(url)
        if "@" in url.partition("://")[2]:
            shown_user = f"{user}:{REDACTED}" if password is not None else user
            url = f"{scheme}://{shown_user}@{after}"
        parts = urlsplit(url)
        query = "&".join(
            f"{pair.partition('=')[0]}={REDACTED}" if _is_password_key(pair) else pair
            for pair in parts.query.split("&")
        )
        return urlunsplit(
            (parts.scheme, parts.netloc, parts.path, query if parts.query else "", "")
        )
    except ValueError:
        return f"{url.partition('://')[0]}://{REDACTED}"


def scrub(text: str, url: str | None) -> str:
    """``text`` with ``url``'s password (raw or percent-encoded) replaced by ``***``."""
    if url is None:
        return text
    text = text.replace(url, redact_url(url))
    password = url_password(url)
    if password:
        for form in sorted({password, quote(password, safe=""), quote(password)}, key=len)[::-1]:
            text = text.replace(form, REDACTED)
    return text


__all__ = [
    "DATABASE_SCHEMES",
    "REDACTED",
    "is_database_url",
    "misencoded",
    "redact_url",
    "scrub",
    "url_password",
]
