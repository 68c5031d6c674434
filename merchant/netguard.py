"""Which network addresses the service may send a customer's webhook to (the SSRF policy).

One policy for every URL a customer can set, used when it is registered or given (literal
addresses) and when a delivery resolves its host (every resolved address). The tables are
explicit, not `ipaddress.is_global` alone: that property varies across Python versions (3.11
calls multicast 224.0.0.1, NAT64 64:ff9b::7f00:1 and 6to4 2002:7f00:1:: global; 3.13 calls every
6to4 address non-global) and knows nothing of cloud metadata endpoints.

Hand-written, not advocate: archived in August 2023 (unmaintained), and its blacklist is the
same kind of table with fewer entries (no NAT64, Teredo or metadata names).
"""

import ipaddress
import socket

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

# Instance-metadata and platform endpoints of the large clouds. Most sit in ranges refused
# anyway; listing them names the reason in last_error, and Azure's wire server is a public
# address that only the explicit entry refuses.
METADATA_ADDRESSES: frozenset[IPAddress] = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",  # AWS, GCP, Azure, OpenStack, DigitalOcean, Oracle...
        "169.254.170.2",  # AWS ECS task metadata
        "169.254.170.23",  # AWS EKS pod identity
        "168.63.129.16",  # Azure wire server (public address)
        "100.100.100.200",  # Alibaba Cloud
        "192.0.0.192",  # Oracle Cloud (legacy)
        "fd00:ec2::254",  # AWS IMDS over IPv6
        "fd00:ec2::23",  # AWS EKS pod identity over IPv6
        "fd20:ce::254",  # GCP metadata over IPv6
    )
)

_IPV4_REFUSED: tuple[tuple[ipaddress.IPv4Network, str], ...] = tuple(
    (ipaddress.IPv4Network(net), label)
    for net, label in (
        ("0.0.0.0/8", "unspecified"),
        ("10.0.0.0/8", "private"),
        ("100.64.0.0/10", "shared CGNAT"),
        ("127.0.0.0/8", "loopback"),
        ("169.254.0.0/16", "link-local"),
        ("172.16.0.0/12", "private"),
        ("192.0.0.0/24", "IETF protocol assignment"),
        ("192.0.2.0/24", "documentation"),
        ("192.88.99.0/24", "6to4 relay anycast"),
        ("192.168.0.0/16", "private"),
        ("198.18.0.0/15", "benchmarking"),
        ("198.51.100.0/24", "documentation"),
        ("203.0.113.0/24", "documentation"),
        ("224.0.0.0/4", "multicast"),
        ("240.0.0.0/4", "reserved"),  # includes 255.255.255.255
    )
)

_IPV6_REFUSED: tuple[tuple[ipaddress.IPv6Network, str], ...] = tuple(
    (ipaddress.IPv6Network(net), label)
    for net, label in (
        ("::/128", "unspecified"),
        ("::1/128", "loopback"),
        ("::/96", "IPv4-compatible"),  # deprecated; no real host has one
        ("::ffff:0:0:0/96", "IPv4-translated"),
        ("64:ff9b::/96", "NAT64"),  # a NAT64 gateway would connect to the embedded IPv4
        ("64:ff9b:1::/48", "local-use NAT64"),
        ("100::/64", "discard-only"),
        ("2001::/32", "Teredo"),  # tunnels to an embedded (obfuscated) IPv4
        ("2001:2::/48", "benchmarking"),
        ("2001:10::/28", "ORCHID"),
        ("2001:20::/28", "ORCHIDv2"),
        ("2001:db8::/32", "documentation"),
        ("3fff::/20", "documentation"),
        ("5f00::/16", "SRv6 SID"),
        ("fc00::/7", "unique-local"),
        ("fe80::/10", "link-local"),
        ("fec0::/10", "site-local"),
        ("ff00::/8", "multicast"),
    )
)

_IPV4_MAPPED = ipaddress.IPv6Network("::ffff:0:0/96")
_SIX_TO_FOUR = ipaddress.IPv6Network("2002::/16")


def address_refusal(address: IPAddress) -> str | None:
    """Why the service must not connect to `address`, or None when it may."""
    if address in METADATA_ADDRESSES:
        return "cloud metadata"
    if isinstance(address, ipaddress.IPv6Address):
        if address.scope_id:
            return "scoped link-local"
        # A v6 form of a v4 address reaches that v4 host: judge the host.
        if address in _IPV4_MAPPED and address.ipv4_mapped is not None:
            inner = address_refusal(address.ipv4_mapped)
            return f"{inner} (IPv4-mapped)" if inner else None
        if address in _SIX_TO_FOUR and address.sixtofour is not None:
            # Judged by its v4 host alone: Python 3.13's is_global calls all of 2002::/16
            # non-global where 3.11 and 3.12 call it global, and the answer must not depend
            # on the interpreter.
            inner = address_refusal(address.sixtofour)
            return f"{inner} (6to4)" if inner else None
        table: tuple[tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, str], ...] = _IPV6_REFUSED
    else:
        table = _IPV4_REFUSED
    for network, label in table:
        if address in network:
            return label
    if not address.is_global:
        return "non-global"  # whatever a newer IANA registry adds, via the stdlib's copy
    return None


def literal_address(host: str) -> IPAddress | None:
    """The address `host` denotes without DNS, or None for a name.

    Besides the canonical forms, the resolver reads inet_aton shorthands ("127.1",
    "2130706433", "0x7f.1") as IPv4 addresses, so they count as literals too.
    """
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        pass
    if host and all(ch in "0123456789abcdefx." for ch in host.lower()):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(host))
        except OSError:
            return None
    return None


def host_resolve(host: str, port: int) -> list[IPAddress]:
    """Every address `host` resolves to, in the resolver's order; raises socket.gaierror.

    Tests replace socket.getaddrinfo: this is the only DNS lookup of a delivery.
    """
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    addresses: list[IPAddress] = []
    for family, _type, _proto, _name, sockaddr in infos:
        if family not in (socket.AF_INET, socket.AF_INET6):
            continue
        address = ipaddress.ip_address(sockaddr[0])
        if address not in addresses:
            addresses.append(address)
    return addresses
