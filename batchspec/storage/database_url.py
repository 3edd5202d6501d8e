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


def url_password(url: str) -> str | None:
    """The password in ``url`` (decoded), or None; also finds ``password=`` in the query."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return None
    if password:
        return unquote(password)
    for pair in parts.query.split("&"):
        key, _, value = pair.partition("=")
        if key == "password" and value:
            return unquote(value)
    return None


def redact_url(url: str) -> str:
    """``url`` with its password shown as ``***``; fit for messages and logs."""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc
        if "@" in netloc:
            userinfo, host = netloc.rsplit("@", 1)
            user, has_password, _ = userinfo.partition(":")
            netloc = f"{user}:{REDACTED}@{host}" if has_password else f"{user}@{host}"
        query = "&".join(
            f"password={REDACTED}" if pair.partition("=")[0] == "password" else pair
            for pair in parts.query.split("&")
        )
        return urlunsplit((parts.scheme, netloc, parts.path, query if parts.query else "", ""))
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
