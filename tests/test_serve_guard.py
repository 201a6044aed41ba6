"""The guard against server-side request forgery, address by address, and the fetcher's
handling of a refused address: an error of its own kind, never retried."""

from __future__ import annotations

import asyncio
import ipaddress
import socket

import pytest

from pipeline.serve.guard import check_url, embedded_ipv4, guarded_socket, is_public
from tests import serve_support
from tests.serve_support import PUBLIC_STAND_IN
from transforms.fetch import Fetcher, FetchPolicy, ForbiddenAddress
from transforms.images import ImageError

loopback_only = serve_support.loopback_only

REFUSED = [
    "127.0.0.1", "127.255.255.254", "::1",                    # loopback
    "10.0.0.1", "172.16.5.4", "192.168.1.1", "fc00::1",        # private
    "169.254.169.254", "fe80::1", "fe80::1%1",                 # link-local, cloud metadata
    "100.64.0.1", "100.127.255.254",                           # CGNAT
    "224.0.0.1", "239.255.255.250", "ff02::1",                 # multicast
    "240.0.0.1", "255.255.255.255", "0.0.0.0", "::",           # reserved, unspecified
    "192.0.2.1", "198.18.0.1", "fec0::1",                      # documentation, benchmarks
    "::ffff:127.0.0.1", "::ffff:169.254.169.254", "::ffff:10.0.0.1",  # IPv4-mapped
    "::127.0.0.1", "::10.0.0.1",                               # IPv4-compatible
    "64:ff9b::7f00:1", "64:ff9b::a9fe:a9fe",                   # NAT64 of loopback, metadata
    "2002:7f00:1::", "2002:a9fe:a9fe::1",                      # 6to4 of loopback, metadata
]  # fmt: skip
ALLOWED = ["93.184.216.34", "8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "2a00:1450::1"]


@pytest.mark.parametrize("address", REFUSED)
def test_addresses_that_are_not_public_hosts_are_refused(address):
    assert not is_public(ipaddress.ip_address(address))
    with pytest.raises(ForbiddenAddress):
        guarded_socket(_addr_info(address))


@pytest.mark.parametrize("address", ALLOWED)
def test_public_addresses_get_a_socket(address):
    assert is_public(ipaddress.ip_address(address))
    with guarded_socket(_addr_info(address)) as made:  # made, never connected
        assert made.family == (socket.AF_INET6 if ":" in address else socket.AF_INET)


def test_the_ipv4_address_inside_ipv6_forms_is_found():
    expected = ipaddress.IPv4Address("169.254.169.254")
    for form in ("::ffff:169.254.169.254", "::169.254.169.254", "64:ff9b::a9fe:a9fe",
                 "2002:a9fe:a9fe::1"):  # fmt: skip
        assert expected in embedded_ipv4(ipaddress.ip_address(form)), form
    assert embedded_ipv4(ipaddress.ip_address("2606:4700:4700::1111")) == []


@pytest.mark.parametrize(
    "url", ["file:///etc/passwd", "/etc/passwd", "s3://b/k", "gs://b/k", "data:,x", "ftp://h/x"]
)
def test_only_http_and_https_urls_pass(url):
    with pytest.raises(ImageError) as caught:
        check_url(url)
    assert caught.value.kind == "unsupported_scheme"
    check_url("HTTPS://example.org/a.png")
    check_url("http://example.org/a.png")


def _addr_info(address: str) -> tuple:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sockaddr = (address, 80, 0, 0) if family == socket.AF_INET6 else (address, 80)
    return (family, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", sockaddr)


# --- The fetcher with a refusing socket factory ----------------------------------------------


def fetch_with_guard(url: str, calls: list) -> bytes:
    def counted(addr_info: tuple) -> socket.socket:
        calls.append(addr_info[4][0])
        return guarded_socket(addr_info)

    async def fetch() -> bytes:
        async with Fetcher(FetchPolicy(max_retries=3), socket_factory=counted) as fetcher:
            return await fetcher.fetch(url)

    return asyncio.run(fetch())


def test_a_refused_address_is_its_own_error_never_retried_nor_named(faulty_host, loopback_only):
    loopback_only.names["inside.test"] = "127.0.0.1"
    port = faulty_host.url.rsplit(":", 1)[1]
    calls: list = []
    with pytest.raises(ImageError) as caught:
        fetch_with_guard(f"http://inside.test:{port}/painting.jpg", calls)
    assert caught.value.kind == "forbidden_address"
    assert "127.0.0.1" not in caught.value.message  # nothing learnt of the network inside
    assert calls == ["127.0.0.1"]  # one attempt, though the policy allows 3 retries
    assert faulty_host.requests == {}


def test_a_name_with_only_refused_addresses_is_refused(faulty_host, loopback_only):
    loopback_only.names["two.test"] = ["10.0.0.1", "127.0.0.1"]
    calls: list = []
    with pytest.raises(ImageError) as caught:
        fetch_with_guard(f"http://two.test:{faulty_host.url.rsplit(':', 1)[1]}/x.jpg", calls)
    assert caught.value.kind == "forbidden_address"
    assert set(calls) == {"10.0.0.1", "127.0.0.1"}  # aiohttp tries each, and all are refused
    assert faulty_host.requests == {}


def test_a_name_with_a_public_address_among_refused_ones_reaches_only_the_public_one(
    faulty_host, loopback_only
):
    port = int(faulty_host.url.rsplit(":", 1)[1])
    loopback_only.names["mixed.test"] = ["127.0.0.1", PUBLIC_STAND_IN]
    loopback_only.stand_ins[PUBLIC_STAND_IN] = ("127.0.0.1", port)
    calls: list = []
    assert fetch_with_guard(f"http://mixed.test:{port}/painting.jpg", calls)
    assert set(calls) == {"127.0.0.1", PUBLIC_STAND_IN}
    assert faulty_host.gets("/painting.jpg") == 1
