"""Which hosts are this machine: one reading for ``batchspec serve`` (may it listen without a
key?) and for spend (is a model server on loopback self-hosted?); and whether an http(s) URL
names a place at all (``unreachable_url``: validate, and a provider's ``OPENAI_BASE_URL``)."""

from __future__ import annotations

import functools
import ipaddress
from urllib.parse import urlsplit


@functools.lru_cache(maxsize=256)  # spend asks once per resource collected, of a few hosts
def is_loopback(host: str) -> bool:
    """Whether ``host`` names this machine's loopback: ``localhost`` (a trailing dot too),
    127.0.0.0/8, ``::1`` (bare or in brackets). ``0.0.0.0`` is not: as an address to listen
    on it is every interface."""
    host = host.strip("[]").rstrip(".").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def unreachable_url(url: str) -> str | None:
    """Why an ``http(s)://`` URL names no place a client can connect to (no host; an empty,
    non-numeric or out-of-range port), or None: ``http://127.0.0.1:/v1`` connected to port
    80, ``:99999`` retried a refused connection for half a minute, ``http://:8000`` failed
    at the first call with another complaint; ``http://[::1/v1`` is no URL at all. Another
    scheme is not judged here."""
    if not url.lower().startswith(("http://", "https://")):
        return None
    try:
        parts = urlsplit(url)
        host = parts.hostname
    except ValueError as err:  # "http://[::1/v1": an unclosed bracket, an address that is none
        return f"is no URL ({err})"
    if not host:
        return "names no host (http://HOST[:PORT]/PATH)"
    if parts.netloc.endswith(":"):
        return "has an empty port: write the port after ':' or leave the ':' out"
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0:
        shown = parts.netloc.rpartition(":")[2]
        return f"has the port {shown!r}, which is no number from 1 to 65535"
    return None
