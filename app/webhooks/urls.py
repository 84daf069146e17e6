"""Which webhook URLs diffq will call: no server-side request forgery through a webhook.

A webhook URL is chosen by the client, and diffq's deliverer POSTs to it from
inside the deployment's network. Without checks, a client could make diffq
call its Redis, an admin port on loopback, a private service, or the cloud
metadata endpoint (which hands out credentials). So a URL is accepted only if
it is plain http(s) without credentials and *every* address its host resolves
to is a public unicast address, unless the deployment allows loopback or
private addresses (``webhook_allow_loopback``, ``webhook_allow_private``).
Link-local, metadata, multicast, unspecified and reserved addresses, and every
block of the IANA IPv4 and IPv6 Special-Purpose Address Registries (plus the
deprecated IPv6 site-local ``fec0::/10``), are never allowed: Python's
``ipaddress`` flags (``is_global`` above all) are used where they suffice, and
``SPECIAL_PURPOSE`` lists the blocks explicitly, because which of them Python
knows depends on its version (3.11's ``is_global`` lets ``fec0::/10``,
``3fff::/20`` and ``192.88.99.0/24`` through). The one exception is an address
that stands for an IPv4 address (IPv4-mapped, NAT64 ``64:ff9b::/96``, as
DNS64 hands out on IPv6-only networks): it is judged as that IPv4 address.

Interface:

- ``check_url(url, allow)`` when a job is submitted (raises
  ``InvalidRequestError`` on field ``webhook.url``). It resolves DNS, which
  blocks: call it off the event loop (``run_in_threadpool``).
- ``resolve_checked(url, allow) -> (ip, port)`` at every delivery: DNS may
  answer differently by then (DNS rebinding), so the check runs again and the
  request goes to the address that was checked (``deliver.py`` pins it).
- ``AllowList.from_settings(settings)`` builds ``allow``.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import SplitResult, urlsplit

from diffq.app.core.errors import FieldProblem, InvalidRequestError
from diffq.app.settings import Settings

FIELD = "webhook.url"
MAX_URL_LENGTH = 2048
SCHEMES = {"http": 80, "https": 443}

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Cloud metadata services: credentials for the machine diffq runs on.
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a) for a in ("169.254.169.254", "169.254.170.2", "fd00:ec2::254", "100.100.100.200")
)
METADATA_HOSTS = frozenset({"metadata.google.internal", "metadata.goog", "metadata"})

PRIVATE_NETWORKS = tuple(ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7"))
CGNAT = ipaddress.ip_network("100.64.0.0/10")  # carrier-grade NAT: a provider's private space
NAT64 = ipaddress.ip_network("64:ff9b::/96")  # IPv6 addresses that embed an IPv4 address

#: The IANA special-purpose registries (iana-ipv4-special-registry, iana-ipv6-special-registry, as of
#: 2025), each block with its name; loopback, private, CGNAT and link-local are decided above them.
SPECIAL_PURPOSE = tuple(
    (ipaddress.ip_network(block), name)
    for block, name in (
        ("0.0.0.0/8", "this network (RFC 791)"),
        ("192.0.0.0/24", "IETF protocol assignments (RFC 6890)"),
        ("192.0.2.0/24", "documentation TEST-NET-1 (RFC 5737)"),
        ("192.31.196.0/24", "AS112-v4 (RFC 7535)"),
        ("192.52.193.0/24", "AMT (RFC 7450)"),
        ("192.88.99.0/24", "deprecated 6to4 relay anycast (RFC 7526)"),
        ("192.175.48.0/24", "direct delegation AS112 service (RFC 7534)"),
        ("198.18.0.0/15", "benchmarking (RFC 2544)"),
        ("198.51.100.0/24", "documentation TEST-NET-2 (RFC 5737)"),
        ("203.0.113.0/24", "documentation TEST-NET-3 (RFC 5737)"),
        ("240.0.0.0/4", "reserved (RFC 1112)"),
        ("255.255.255.255/32", "limited broadcast (RFC 919)"),
        ("::/128", "unspecified (RFC 4291)"),
        ("::ffff:0:0/96", "IPv4-mapped (RFC 4291)"),
        ("64:ff9b:1::/48", "IPv4-IPv6 translation, local use (RFC 8215)"),
        ("100::/64", "discard-only (RFC 6666)"),
        ("100:0:0:1::/64", "dummy IPv6 prefix (RFC 9780)"),
        ("2001::/23", "IETF protocol assignments: Teredo, ORCHIDv2, AS112, AMT, benchmarking, ... (RFC 2928)"),
        ("2001:db8::/32", "documentation (RFC 3849)"),
        ("2002::/16", "6to4 (RFC 3056)"),
        ("2620:4f:8000::/48", "direct delegation AS112 service (RFC 7534)"),
        ("3fff::/20", "documentation (RFC 9637)"),
        ("5f00::/16", "segment routing (SRv6) SIDs (RFC 9602)"),
        ("fec0::/10", "deprecated site-local (RFC 3879)"),
    )
)


@dataclass(frozen=True)
class AllowList:
    """Address classes a deployment lets webhooks reach beyond the public internet."""

    loopback: bool = False
    private: bool = False

    @classmethod
    def from_settings(cls, settings: Settings) -> AllowList:
        return cls(loopback=settings.webhook_allow_loopback, private=settings.webhook_allow_private)


@dataclass(frozen=True)
class Target:
    """A checked URL's parts: what to connect to, and what to call the host in HTTP and TLS."""

    scheme: str
    host: str  # as in the URL, lowercase, without brackets
    port: int


def check_url(url: str, allow: AllowList) -> None:
    """Raise ``InvalidRequestError`` (field ``webhook.url``) unless diffq may POST to ``url``."""
    resolve_checked(url, allow)


def resolve_checked(url: str, allow: AllowList) -> tuple[str, int]:
    """The address to deliver to: the first one DNS gives, after checking all of them."""
    target = parse(url)
    addresses = resolve(target.host, target.port)
    for address in addresses:
        problem = address_problem(address, allow)
        if problem is not None:
            raise _invalid(f"host {target.host!r} resolves to {address}, {problem}")
    return str(addresses[0]), target.port


def parse(url: str) -> Target:
    """Check the URL's form (scheme, credentials, host, port) without touching the network."""
    if not isinstance(url, str) or not url:
        raise _invalid("must be an http or https URL")
    if len(url) > MAX_URL_LENGTH:
        raise _invalid(f"is {len(url)} characters long; at most {MAX_URL_LENGTH} accepted")
    if any(char <= " " or char == "\x7f" for char in url):
        raise _invalid("must not contain spaces or control characters")
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise _invalid(f"scheme {parts.scheme!r} is not allowed; use http or https")
    if "@" in parts.netloc:
        raise _invalid("must not contain a user name or password; put a token in the path or query")
    host = parts.hostname
    if not host:
        raise _invalid("has no host")
    if host.rstrip(".") in METADATA_HOSTS:
        raise _invalid(f"host {host!r} is a cloud metadata service")
    return Target(scheme=scheme, host=host, port=_port(parts, scheme))


def resolve(host: str, port: int) -> list[IPAddress]:
    """Every address ``host`` resolves to (an IP literal resolves to itself, without DNS)."""
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as exc:
        raise _invalid(f"host {host!r} does not resolve: {exc}") from exc
    addresses: list[IPAddress] = []
    for _family, _type, _proto, _name, sockaddr in infos:
        address = ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])  # drop an IPv6 zone id
        if address not in addresses:
            addresses.append(address)
    if not addresses:
        raise _invalid(f"host {host!r} has no addresses")
    return addresses


def address_problem(address: IPAddress, allow: AllowList) -> str | None:
    """Why diffq may not call ``address``, or ``None`` if it may."""
    address = _embedded_ipv4(address) or address
    if address in METADATA_ADDRESSES:
        return "a cloud metadata address"
    if address.is_unspecified:
        return "an unspecified address"
    if address.is_loopback:
        return None if allow.loopback else "a loopback address"
    if address.is_link_local:
        return "a link-local address"
    if address.is_multicast:
        return "a multicast address"
    if address in CGNAT or any(address in network for network in PRIVATE_NETWORKS):
        return None if allow.private else "a private address"
    for network, name in SPECIAL_PURPOSE:
        if address.version == network.version and address in network:
            return f"a special-purpose address: {network} {name}"
    if address.is_reserved:
        return "a reserved address"
    if not address.is_global:
        return "not a public address"
    return None


def _embedded_ipv4(address: IPAddress) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for (mapped, NAT64), which is where packets to it
    would really go. (6to4, ``2002::/16``, is refused as a whole: its relays are deprecated.)"""
    if not isinstance(address, ipaddress.IPv6Address):
        return None
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address in NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def _port(parts: SplitResult, scheme: str) -> int:
    try:
        port = parts.port
    except ValueError as exc:
        raise _invalid(f"has an invalid port: {exc}") from exc
    if port == 0:
        raise _invalid("has port 0")
    return port if port is not None else SCHEMES[scheme]


def _invalid(message: str) -> InvalidRequestError:
    return InvalidRequestError([FieldProblem(FIELD, message)])
