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
"""

from __future__ import annotations

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

    The credentials run to the *last* ``@``, so a password left unencoded with a ``/``, ``?``
    or ``#`` in it (libpq reads it whole; ``urlsplit`` would cut it into path, query or
    fragment) is still found. An ``@`` left unencoded in the query makes this take too much as
    the password, which only hides more.
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
    "redact_url",
    "scrub",
    "url_password",
]
