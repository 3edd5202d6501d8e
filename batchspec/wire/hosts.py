"""Which hosts are this machine: one reading for ``batchspec serve`` (may it listen without a
key?) and for spend (is a model server on loopback self-hosted?)."""

from __future__ import annotations

import functools
import ipaddress


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
