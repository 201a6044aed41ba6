"""The service's guard against server-side request forgery: it fetches URLs that strangers
send it, so it must never be made to reach what only it can reach (its own loopback, the
private networks around it, the cloud's metadata address at 169.254.169.254).

Two checks. The URL's scheme must be http or https (no local paths, no buckets, no data:
URIs). And every address is checked as the socket for it is made, after the name has been
resolved: aiohttp calls `guarded_socket` for each address it is about to connect to, IP
literals included, and again for each redirect's host. Checking the resolved address,
not the name, at connect time, leaves DNS rebinding no gap between a check and its use.

The URIs an index names (a thumbnail's image: never a URI from a request) may also be on
the service's own disk (paths, file://, members of local zip and tar archives), data:
URIs, or in buckets (gs://, s3://: their library talks to the cloud's own endpoints, not
to a host the URI names). An http(s) URI among them is fetched as a request's URL is,
through the same guard. Any other scheme fsspec could open (ftp://, sftp://, an archive
fetched over http) would reach a host the guard never sees: refused.
"""

from __future__ import annotations

import ipaddress
import socket

from transforms.fetch import ForbiddenAddress, locate
from transforms.images import ImageError, brief

FETCHED_SCHEMES = ("http", "https")
# Where the bytes of an index's other URIs may be stored ("": a local path or file://).
INDEX_STORAGE_SCHEMES = ("", "data", "gs", "gcs", "s3", "s3a")

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Every property that marks an address as not a public host's (`is_global` alone misses
# multicast). The IPv4 address inside an IPv6 form is checked too, whatever this Python's
# tables say of the IPv6 prefix: they have changed between Python releases.
NOT_PUBLIC = (
    "is_private",  # 10/8, 172.16/12, 192.168/16, fc00::/7, documentation ranges...
    "is_loopback",
    "is_link_local",  # 169.254/16 (the metadata address), fe80::/10
    "is_multicast",
    "is_reserved",  # 240/4, and ::/8 with the IPv4-compatible ::a.b.c.d
    "is_unspecified",
    "is_site_local",  # fec0::/10 (IPv6 only)
)

# IPv6 forms that carry an IPv4 address a gateway may deliver to: NAT64's well-known prefix.
NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


def check_url(url: str) -> None:
    """Raises ImageError unsupported_scheme for anything but an http(s) URL."""
    scheme = locate(url.strip()).scheme
    if scheme not in FETCHED_SCHEMES:
        said = f"{scheme}: URIs" if scheme else "local paths"
        message = f"{brief(url)}: only http(s) URLs are fetched, not {said}"
        raise ImageError("unsupported_scheme", message)


def check_index_uri(uri: str) -> None:
    """Raises ImageError unsupported_scheme for a URI in an index that the service does not
    read (see the module's docstring); the rest, http(s) URLs through the guard."""
    location = locate(uri.strip())
    if location.scheme in FETCHED_SCHEMES or location.storage.scheme in INDEX_STORAGE_SCHEMES:
        return
    where = f"{location.storage.scheme}:// URIs"
    where = f"archives read from {where}" if location.archive else where
    message = (
        f"{brief(uri)}: the service reads the index's images from local files, data: URIs, "
        f"buckets and http(s) URLs, not from {where}"
    )
    raise ImageError("unsupported_scheme", message)


def is_public(address: IPAddress) -> bool:
    """Whether `address`, and any IPv4 address embedded in it, is a public host's: not
    loopback, private, link-local, CGNAT (100.64/10), multicast, reserved or unspecified."""
    if not address.is_global or any(getattr(address, name, False) for name in NOT_PUBLIC):
        return False
    return all(is_public(embedded) for embedded in embedded_ipv4(address))


def embedded_ipv4(address: IPAddress) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address stands for: IPv4-mapped (::ffff:a.b.c.d),
    IPv4-compatible (::a.b.c.d), NAT64 (64:ff9b::a.b.c.d), 6to4 and Teredo."""
    if isinstance(address, ipaddress.IPv4Address):
        return []
    low32 = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    compatible = int(address) >> 32 == 0
    candidates = [
        address.ipv4_mapped,
        low32 if compatible or address in NAT64 else None,
        address.sixtofour,
        *(address.teredo or ()),
    ]
    return [candidate for candidate in candidates if candidate is not None]


def guarded_socket(addr_info: tuple) -> socket.socket:
    """aiohttp's `socket_factory`: a socket for a public address, ForbiddenAddress for any
    other. `addr_info` is getaddrinfo's (family, type, proto, canonname, sockaddr)."""
    family, type_, proto, _, sockaddr = addr_info
    try:
        address = ipaddress.ip_address(sockaddr[0])
    except ValueError:  # not an IP address at all: nothing to vet, so nothing to allow
        raise ForbiddenAddress() from None
    if not is_public(address):
        raise ForbiddenAddress()
    return socket.socket(family=family, type=type_, proto=proto)
