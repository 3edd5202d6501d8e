"""How ``NO_PROXY`` is read, as curl reads it: one reading for the engine's upstream pool
(``engine.http11``) and the providers' clients (``providers._http.new_client``), so a host a
user exempted from the proxy is exempted from it everywhere.

httpx reads ``NO_PROXY`` itself, but not its networks: ``10.0.0.0/8`` exempts no address there.
"""

from __future__ import annotations

import ipaddress


def bypasses_proxy(hostname: str, port: int, no_proxy: str) -> bool:
    """Whether ``NO_PROXY`` names the host (as curl reads it): ``*``, the host or a domain it
    is in (``lan``, ``.lan``), either with ``:port``, an IPv6 address bare or in brackets
    (``::1``, ``[::1]:8000``), or a network its address is in (``10.0.0.0/8``, ``fd00::/8``).
    An IP address is never matched as a domain (``.0.0.1`` does not name 127.0.0.1)."""
    hostname = hostname.lower()
    try:
        address: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(
            hostname
        )
    except ValueError:
        address = None
    for entry in no_proxy.split(","):
        name = entry.strip().lower()
        if name == "*":
            return True
        if "/" in name:  # a network (CIDR)
            try:
                network = ipaddress.ip_network(name.strip("[]"), strict=False)
            except ValueError:
                continue
            if address is not None and address.version == network.version and address in network:
                return True
            continue
        host, entry_port = _host_and_port(name)
        host = host.lstrip(".")
        if not host or (entry_port is not None and entry_port != port):
            continue
        # an address matches only itself (or a network): "0.0.1" is no domain of 127.0.0.1
        if host == hostname or (address is None and hostname.endswith(f".{host}")):
            return True
    return False


def _host_and_port(entry: str) -> tuple[str, int | None]:
    """A ``NO_PROXY`` entry as (host, port or None): ``h``, ``h:80``, ``::1``, ``[::1]:80``."""
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif entry.count(":") == 1:
        host, _, port = entry.partition(":")
    else:  # a name, or a bare IPv6 address (whose colons are not a port)
        host, port = entry, ""
    return host, int(port) if port.isdigit() else None
