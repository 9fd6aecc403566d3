"""Which IP addresses a fetch may connect to (the SSRF guard).

Decided on the address actually connected to, after DNS resolution, on every redirect hop.
Built on the IANA special-purpose address registries (RFC 6890), transcribed below as explicit
tables with each block's RFC and the registry's "Globally Reachable" value:

- IPv4: https://www.iana.org/assignments/iana-ipv4-special-registry
- IPv6: https://www.iana.org/assignments/iana-ipv6-special-registry

Unless an allow-listed network (`fetch.allow_networks`) contains it, an address is refused when:

1. it is a scoped IPv6 address (fe80::1%eth0);
2. it is an IPv6 form that carries an IPv4 address (IPv4-mapped ::ffff:a.b.c.d, SIIT
   ::ffff:0:a.b.c.d, IPv4-compatible ::a.b.c.d, NAT64 64:ff9b::a.b.c.d, 6to4 2002::/16, Teredo
   2001::/32) and the IPv4 address it carries is refused — the packets end up there;
3. the most specific registry block containing it is not "Globally Reachable" (False, or N/A /
   blank for a terminated block). Local-use NAT64 64:ff9b:1::/48 (RFC 8215) is refused outright:
   its translator may map it to any IPv4 address, e.g. 64:ff9b:1::a9fe:a9fe -> 169.254.169.254;
4. it is multicast (224.0.0.0/4, ff00::/8), deprecated site-local (fec0::/10, RFC 3879), or an
   IPv6 address outside global unicast 2000::/3 (IANA IPv6 address space registry);
5. no table covers it and Python's `ipaddress` does not call it global (a backstop only: its
   tables differ between Python versions, so it never overrules an entry of ours).

Cloud metadata hostnames are refused by name before any DNS lookup.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Optional, Union

IP = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
Network = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

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

# (block, name, RFC, Globally Reachable): True / False, None for the registry's N/A or blank.
# Transcribed from the registries as of 2025 (IPv6 last entry added: 100:0:0:1::/64, RFC 9780).
IPV4_SPECIAL_REGISTRY: tuple[tuple[str, str, str, Optional[bool]], ...] = (
    ("0.0.0.0/8", '"this network"', "RFC 791 §3.2", False),
    ("0.0.0.0/32", '"this host on this network"', "RFC 1122 §3.2.1.3", False),
    ("10.0.0.0/8", "private-use", "RFC 1918", False),
    ("100.64.0.0/10", "shared address space (carrier-grade NAT)", "RFC 6598", False),
    ("127.0.0.0/8", "loopback", "RFC 1122 §3.2.1.3", False),
    ("169.254.0.0/16", "link local (cloud metadata lives here)", "RFC 3927", False),
    ("172.16.0.0/12", "private-use", "RFC 1918", False),
    ("192.0.0.0/24", "IETF protocol assignments", "RFC 6890 §2.1", False),
    ("192.0.0.0/29", "IPv4 service continuity prefix", "RFC 7335", False),
    ("192.0.0.8/32", "IPv4 dummy address", "RFC 7600", False),
    ("192.0.0.9/32", "Port Control Protocol anycast", "RFC 7723", True),
    ("192.0.0.10/32", "Traversal Using Relays around NAT anycast", "RFC 8155", True),
    ("192.0.0.170/32", "NAT64/DNS64 discovery", "RFC 8880, RFC 7050 §2.2", False),
    ("192.0.0.171/32", "NAT64/DNS64 discovery", "RFC 8880, RFC 7050 §2.2", False),
    ("192.0.2.0/24", "documentation (TEST-NET-1)", "RFC 5737", False),
    ("192.31.196.0/24", "AS112-v4", "RFC 7535", True),
    ("192.52.193.0/24", "AMT", "RFC 7450", True),
    ("192.88.99.0/24", "deprecated 6to4 relay anycast (terminated)", "RFC 7526", None),
    ("192.88.99.2/32", "6a44-relay anycast address", "RFC 6751", False),
    ("192.168.0.0/16", "private-use", "RFC 1918", False),
    ("192.175.48.0/24", "direct delegation AS112 service", "RFC 7534", True),
    ("198.18.0.0/15", "benchmarking", "RFC 2544", False),
    ("198.51.100.0/24", "documentation (TEST-NET-2)", "RFC 5737", False),
    ("203.0.113.0/24", "documentation (TEST-NET-3)", "RFC 5737", False),
    ("240.0.0.0/4", "reserved", "RFC 1112 §4", False),
    ("255.255.255.255/32", "limited broadcast", "RFC 8190, RFC 919 §7", False),
)

IPV6_SPECIAL_REGISTRY: tuple[tuple[str, str, str, Optional[bool]], ...] = (
    ("::1/128", "loopback address", "RFC 4291", False),
    ("::/128", "unspecified address", "RFC 4291", False),
    ("::ffff:0:0/96", "IPv4-mapped address", "RFC 4291", False),  # judged by the IPv4 it carries
    ("64:ff9b::/96", "IPv4-IPv6 translation (well-known NAT64)", "RFC 6052", True),  # idem
    ("64:ff9b:1::/48", "IPv4-IPv6 translation (local-use NAT64)", "RFC 8215", False),
    ("100::/64", "discard-only address block", "RFC 6666", False),
    ("100:0:0:1::/64", "dummy IPv6 prefix", "RFC 9780", False),
    ("2001::/23", "IETF protocol assignments", "RFC 2928", False),
    ("2001::/32", "Teredo", "RFC 4380, RFC 8190", None),  # judged by the IPv4 it carries
    ("2001:1::1/128", "Port Control Protocol anycast", "RFC 7723", True),
    ("2001:1::2/128", "Traversal Using Relays around NAT anycast", "RFC 8155", True),
    ("2001:1::3/128", "DNS-SD service registration protocol anycast", "RFC 9665", True),
    ("2001:2::/48", "benchmarking", "RFC 5180, RFC Errata 1752", False),
    ("2001:3::/32", "AMT", "RFC 7450", True),
    ("2001:4:112::/48", "AS112-v6", "RFC 7535", True),
    ("2001:10::/28", "deprecated ORCHID (terminated)", "RFC 4843", None),
    ("2001:20::/28", "ORCHIDv2", "RFC 7343", True),
    ("2001:30::/28", "drone remote ID protocol entity tags (DETs)", "RFC 9374", True),
    ("2001:db8::/32", "documentation", "RFC 3849", False),
    ("2002::/16", "6to4", "RFC 3056", None),  # judged by the IPv4 it carries
    ("2620:4f:8000::/48", "direct delegation AS112 service", "RFC 7534", True),
    ("3fff::/20", "documentation", "RFC 9637", False),
    ("5f00::/16", "segment routing (SRv6) SIDs", "RFC 9602", False),
    ("fc00::/7", "unique-local", "RFC 4193, RFC 8190", False),
    ("fe80::/10", "link-local unicast", "RFC 4291", False),
)

# Outside the special-purpose registries, refused as well.
OTHER_REFUSED: tuple[tuple[str, str, str], ...] = (
    ("224.0.0.0/4", "multicast address", "RFC 5771"),
    ("ff00::/8", "multicast address", "RFC 4291"),
    ("fec0::/10", "deprecated site-local address", "RFC 3879"),
)
IPV6_GLOBAL_UNICAST = ipaddress.IPv6Network("2000::/3")  # IANA IPv6 address space registry, RFC 4291


@dataclass(frozen=True)
class Block:
    network: Network
    name: str
    rfc: str
    globally_reachable: Optional[bool]

    def describe(self) -> str:
        return f"{self.name} ({self.network}, {self.rfc})"


def _blocks(rows: Iterable[tuple[str, str, str, Optional[bool]]]) -> tuple[Block, ...]:
    return tuple(Block(ipaddress.ip_network(c), n, r, g) for c, n, r, g in rows)


SPECIAL_BLOCKS: tuple[Block, ...] = _blocks(IPV4_SPECIAL_REGISTRY + IPV6_SPECIAL_REGISTRY)
OTHER_BLOCKS: tuple[Block, ...] = _blocks((c, n, r, False) for c, n, r in OTHER_REFUSED)


def special_block(ip: IP) -> Optional[Block]:
    """The most specific registry block that contains `ip` (None: not special-purpose)."""
    best: Optional[Block] = None
    for b in SPECIAL_BLOCKS:
        inside = b.network.version == ip.version and ip in b.network
        if inside and (best is None or b.network.prefixlen > best.network.prefixlen):
            best = b
    return best


# IPv6 forms that carry an IPv4 address in their low (or, for 6to4 / Teredo, inner) bits.
_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")  # RFC 4291 §2.5.5.2
_SIIT = ipaddress.IPv6Network("::ffff:0:0:0/96")  # IPv4-translated, RFC 2765 (SIIT; RFC 6052 §2, RFC 7915)
_COMPAT = ipaddress.IPv6Network("::/96")  # IPv4-compatible, deprecated (RFC 4291 §2.5.5.1); less :: and ::1
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # well-known NAT64 prefix, RFC 6052


def _embedded_v4(ip: ipaddress.IPv6Address) -> Optional[tuple[str, ipaddress.IPv4Address]]:
    low32 = ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    if ip in _MAPPED:
        return "IPv4-mapped", low32
    if ip in _SIIT:
        return "SIIT IPv4-translated", low32
    if ip in _COMPAT and int(ip) > 1:  # :: and ::1 are unspecified and loopback, not 0.0.0.0/0.0.0.1
        return "IPv4-compatible", low32
    if ip in _NAT64:
        return "NAT64", low32
    if ip.sixtofour is not None:
        return "6to4", ip.sixtofour
    if ip.teredo is not None:
        return "Teredo", ip.teredo[1]
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
            embedded = _embedded_v4(ip)
            if embedded is not None:
                form, v4 = embedded
                why = self.refusal(v4)
                return None if why is None else f"{form} address embeds {v4}: {why}"
        block = special_block(ip)
        if block is not None and block.globally_reachable is not True:
            return f"{block.describe()}: not globally reachable (IANA special-purpose registry)"
        for other in OTHER_BLOCKS:
            if other.network.version == ip.version and ip in other.network:
                return other.describe()
        if isinstance(ip, ipaddress.IPv6Address) and ip not in IPV6_GLOBAL_UNICAST:
            return f"outside IPv6 global unicast {IPV6_GLOBAL_UNICAST} (reserved by the IETF)"
        if block is None and not ip.is_global:
            return "not a global address (Python ipaddress)"
        return None

    def hostname_refusal(self, host: str) -> Optional[str]:
        name = host.rstrip(".").lower()
        if name in METADATA_HOSTNAMES:
            return f"cloud metadata hostname {name!r}"
        return None
