"""Which IP addresses a fetch may connect to (the SSRF guard).

Decided on the address actually connected to, after DNS resolution, on every redirect hop.
Refused unless an allow-listed network contains it: anything that is not a global unicast
address (loopback, RFC 1918 private, carrier-grade NAT, link-local incl. 169.254.169.254,
unspecified, reserved, documentation, benchmarking ranges), multicast, and IPv6 forms that embed
an IPv4 address (v4-mapped ::ffff:a.b.c.d, NAT64 64:ff9b::/96, 6to4 2002::/16, Teredo), which are
judged by the embedded IPv4 address. Cloud metadata hostnames are refused by name before any DNS
lookup.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from typing import Optional, Union

IP = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]

METADATA_HOSTNAMES = frozenset(
    {
        "metadata",
        "metadata.google.internal",
        "metadata.goog",
        "metadata.azure.com",
        "instance-data",
        "instance-data.ec2.internal",
        "metadata.tencentyun.com",
        "metadata.platformequinix.com",
    }
)

_NAT64 = ipaddress.ip_network("64:ff9b::/96")


def _embedded_v4(ip: ipaddress.IPv6Address) -> Optional[ipaddress.IPv4Address]:
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip.teredo is not None:
        return ip.teredo[1]
    return None


class AddressPolicy:
    """`refusal(ip)` is None for an address we may connect to, else why not."""

    def __init__(self, allow_networks: Iterable[str] = ()) -> None:
        self.allow = tuple(ipaddress.ip_network(c, strict=False) for c in allow_networks)

    def _allowed(self, ip: IP) -> bool:
        return any(ip.version == net.version and ip in net for net in self.allow)

    def refusal(self, ip: IP) -> Optional[str]:
        if self._allowed(ip):
            return None
        if isinstance(ip, ipaddress.IPv6Address):
            if ip.scope_id:
                return "scoped IPv6 address"
            v4 = _embedded_v4(ip)
            if v4 is not None:
                why = self.refusal(v4)
                return None if why is None else f"embeds {v4}: {why}"
        if ip.is_multicast:
            return "multicast address"
        if ip.is_unspecified:
            return "unspecified address"
        if ip.is_loopback:
            return "loopback address"
        if ip.is_link_local:
            return "link-local address (cloud metadata lives here)"
        if not ip.is_global:
            return "private or reserved address"
        return None

    def hostname_refusal(self, host: str) -> Optional[str]:
        name = host.rstrip(".").lower()
        if name in METADATA_HOSTNAMES:
            return f"cloud metadata hostname {name!r}"
        return None
