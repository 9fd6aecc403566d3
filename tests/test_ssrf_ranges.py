"""The SSRF guard against the IANA special-purpose address registries (RFC 6890).

The ranges below are a second, independent transcription of the registries
(https://www.iana.org/assignments/iana-ipv4-special-registry, iana-ipv6-special-registry): every
block whose "Globally Reachable" is not True, plus multicast and deprecated site-local. Each must
be refused at its first and last address, with a reason. Nothing here connects anywhere except
the end-to-end case, which runs the real fetch layer against a loopback canary.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator
from typing import Any

import pyarrow as pa
import pytest

from curate.config import FetchConfig
from curate.demo.image_server import ImageServer
from curate.fetching.policy import AddressPolicy
from curate.stages.fetch import fetch_shard

REFUSED_V4 = [
    "0.0.0.0/8",  # "this network", RFC 791
    "0.0.0.0/32",  # "this host on this network", RFC 1122
    "10.0.0.0/8",  # private-use, RFC 1918
    "100.64.0.0/10",  # shared address space, RFC 6598
    "127.0.0.0/8",  # loopback, RFC 1122
    "169.254.0.0/16",  # link local, RFC 3927
    "172.16.0.0/12",  # private-use, RFC 1918
    "192.0.0.0/24",  # IETF protocol assignments, RFC 6890
    "192.0.0.0/29",  # IPv4 service continuity prefix, RFC 7335
    "192.0.0.8/32",  # IPv4 dummy address, RFC 7600
    "192.0.0.170/32",  # NAT64/DNS64 discovery, RFC 8880 / RFC 7050
    "192.0.0.171/32",  # NAT64/DNS64 discovery
    "192.0.2.0/24",  # TEST-NET-1, RFC 5737
    "192.88.99.0/24",  # deprecated 6to4 relay anycast, RFC 7526 (terminated: blank)
    "192.88.99.2/32",  # 6a44-relay anycast, RFC 6751
    "192.168.0.0/16",  # private-use, RFC 1918
    "198.18.0.0/15",  # benchmarking, RFC 2544
    "198.51.100.0/24",  # TEST-NET-2, RFC 5737
    "203.0.113.0/24",  # TEST-NET-3, RFC 5737
    "240.0.0.0/4",  # reserved, RFC 1112
    "255.255.255.255/32",  # limited broadcast, RFC 919 / RFC 8190
    "224.0.0.0/4",  # multicast (IPv4 multicast address space registry, RFC 5771)
]
REFUSED_V6 = [
    "::1/128",  # loopback, RFC 4291
    "::/128",  # unspecified, RFC 4291
    "::ffff:0:0/96",  # IPv4-mapped, RFC 4291 (first/last embed 0.0.0.0 / 255.255.255.255)
    "64:ff9b:1::/48",  # local-use NAT64, RFC 8215
    "100::/64",  # discard-only, RFC 6666
    "100:0:0:1::/64",  # dummy IPv6 prefix, RFC 9780
    "2001::/23",  # IETF protocol assignments, RFC 2928
    "2001::/32",  # Teredo, RFC 4380 (N/A: judged by the embedded client address)
    "2001:2::/48",  # benchmarking, RFC 5180
    "2001:10::/28",  # deprecated ORCHID, RFC 4843 (terminated: blank)
    "2001:db8::/32",  # documentation, RFC 3849
    "2002::/16",  # 6to4, RFC 3056 (N/A: judged by the embedded address)
    "3fff::/20",  # documentation, RFC 9637
    "5f00::/16",  # segment routing (SRv6) SIDs, RFC 9602
    "fc00::/7",  # unique-local, RFC 4193
    "fe80::/10",  # link-local unicast, RFC 4291
    "fec0::/10",  # site-local, deprecated by RFC 3879
    "ff00::/8",  # multicast, RFC 4291
]


def _ends(cidr: str) -> list[str]:
    net = ipaddress.ip_network(cidr)
    return sorted({str(net.network_address), str(net.broadcast_address)})


ENDS = [(cidr, ip) for cidr in REFUSED_V4 + REFUSED_V6 for ip in _ends(cidr)]


def refusal(ip: str, allow: tuple[str, ...] = ()) -> Any:
    return AddressPolicy(allow).refusal(ipaddress.ip_address(ip))


@pytest.mark.parametrize(("cidr", "ip"), ENDS, ids=[f"{c}-{i}" for c, i in ENDS])
def test_every_non_global_registry_block_is_refused_at_both_ends(cidr: str, ip: str) -> None:
    why = refusal(ip)
    assert isinstance(why, str) and why, (cidr, ip)


# the five forms the policy used to let through, each carrying (or translating to) a private target
FORMS = {
    "64:ff9b:1::a9fe:a9fe": "64:ff9b:1::/48",  # local-use NAT64 -> 169.254.169.254 (cloud metadata)
    "64:ff9b:1::7f00:1": "64:ff9b:1::/48",  # local-use NAT64 -> 127.0.0.1
    "::ffff:0:7f00:1": "embeds 127.0.0.1",  # SIIT IPv4-translated ::ffff:0:a.b.c.d
    "::ffff:0:a9fe:a9fe": "embeds 169.254.169.254",
    "::7f00:1": "embeds 127.0.0.1",  # IPv4-compatible ::a.b.c.d (deprecated)
    "::a9fe:a9fe": "embeds 169.254.169.254",
    "fec0::1": "fec0::/10",  # site-local (deprecated)
    "fec0:ffff::1": "fec0::/10",
    "192.0.0.100": "192.0.0.0/24",  # IETF protocol assignments (outside the /29 and the /32s)
    "192.0.0.255": "192.0.0.0/24",
}


@pytest.mark.parametrize("ip", list(FORMS))
def test_forms_that_used_to_pass_are_refused_and_the_reason_says_why(ip: str) -> None:
    why = refusal(ip)
    assert why is not None and FORMS[ip] in why, why


@pytest.mark.parametrize(
    "ip",
    ["5f00::1", "3fff::1", "100:0:0:1::1", "192.88.99.1", "1::1", "64:ff9b:0:0:1::1", "::ffff:0:a00:1", "::c0a8:101"],
)
def test_more_ranges_that_used_to_pass_are_refused(ip: str) -> None:
    # SRv6 SIDs, RFC 9637 documentation, dummy prefix, the terminated 6to4 relay block, IETF-reserved
    # space outside 2000::/3 (next to, but outside, the NAT64 /96), SIIT and compat embedding RFC 1918
    assert refusal(ip) is not None


@pytest.mark.parametrize(
    "ip",
    [
        "8.8.8.8",
        "1.1.1.1",
        "2606:4700:4700::1111",
        "2001:4860:4860::8888",
        "::ffff:8.8.8.8",
        "64:ff9b::808:808",
        "2002:808:808::1",
    ],
)
def test_public_addresses_and_their_embeddings_are_allowed(ip: str) -> None:
    assert refusal(ip) is None


def test_registry_reasons_name_the_block_and_its_rfc() -> None:
    assert "192.0.0.0/24" in refusal("192.0.0.100") and "RFC 6890" in refusal("192.0.0.100")
    assert "RFC 8215" in refusal("64:ff9b:1::a9fe:a9fe")
    assert "169.254.169.254" in refusal("64:ff9b::a9fe:a9fe")  # well-known NAT64: judged by what it embeds


def test_allow_networks_still_exempt_and_scoped_v6_still_refused() -> None:
    assert refusal("64:ff9b:1::a9fe:a9fe", ("64:ff9b:1::/48",)) is None
    assert refusal("::ffff:0:7f00:2", ("127.0.0.2/32",)) is None  # SIIT form of an allowed address
    assert refusal("::ffff:0:7f00:3", ("127.0.0.2/32",)) is not None
    assert "scoped" in refusal("2606:4700:4700::1111%eth0")
    assert AddressPolicy().hostname_refusal("metadata.google.internal.") is not None


# --- end to end: the real fetch layer, a loopback canary that must see nothing ------------------------
@pytest.fixture()
def canary() -> Iterator[ImageServer]:
    with ImageServer("127.0.0.1") as srv:
        srv.add("/x.jpg", b"\xff\xd8\xff" + b"\x00" * 64)
        yield srv


@pytest.mark.parametrize("host", ["[64:ff9b:1::7f00:1]", "[::ffff:0:7f00:1]", "[::7f00:1]", "[fec0::1]"])
def test_refused_forms_never_reach_the_server(host: str, canary: ImageServer, tmp_path: Any) -> None:
    url = f"http://{host}:{canary.port}/x.jpg"
    cfg = FetchConfig(threads=1, retries=0, timeout_s=1, deadline_s=3)  # bounded if the guard failed open
    status, images = fetch_shard(pa.table({"row": [0], "url": [url]}), cfg, str(tmp_path), "ssrf")
    rec = status.to_pylist()[0]
    assert rec["fetch_status"] == "blocked_address", rec
    assert canary.hits == {}
    assert images.num_rows == 0
