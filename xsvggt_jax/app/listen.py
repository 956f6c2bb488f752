"""The address `xsvggt view` listens on, checked before its server starts.

viser (through asyncio) binds every address a `--host` resolves to, and on any error tries the next
port, a thousand times, then waits forever: an address this machine does not have, a name that does
not resolve, or "" (every interface, announced as `http://:PORT`) hung or exposed the server. So
`listen_address` resolves the host (no name resolver for an IP literal, a bounded wait for a name)
and test-binds each address on any port (nothing is sent anywhere), and allows every interface only
for an explicit wildcard (0.0.0.0, ::), with a warning.
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import re
import socket
import threading

from xsvggt_jax.errors import InputError

log = logging.getLogger(__name__)

RESOLVE_TIMEOUT_S = 10.0  # a --host name the resolver does not answer for: an error after this long


class HostError(InputError):
    """A --host that is empty, not an address, does not resolve, or cannot be listened on here."""


def _ip_literal(host: str):
    """`host` as an IP address, None for a name; HostError for "" and for what looks like an address
    and is none (never handed to the name resolver)."""
    if not host.strip():
        raise HostError("--host is empty: give the address to listen on (127.0.0.1: this machine only; "
                        "0.0.0.0 or :: listen on every interface)")
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        pass
    if re.fullmatch(r"[0-9.]+", host) or ":" in host:
        raise HostError(f"--host {host}: not a valid IP address")
    return None


def _resolve(host: str, literal) -> list[tuple]:
    """getaddrinfo's TCP addresses of `host` (as asyncio's server resolves it), within RESOLVE_TIMEOUT_S."""
    found: dict = {}

    def lookup() -> None:
        try:
            found["infos"] = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM,
                                                flags=socket.AI_NUMERICHOST if literal is not None else 0)
        except OSError as e:
            found["error"] = e

    worker = threading.Thread(target=lookup, daemon=True, name="xsvggt-view-resolve")
    worker.start()
    worker.join(RESOLVE_TIMEOUT_S)
    if worker.is_alive():
        raise HostError(f"--host {host}: the name resolver did not answer within {RESOLVE_TIMEOUT_S:.0f} s")
    if "error" in found:
        e = found["error"]
        raise HostError(f"--host {host}: cannot resolve it ({e.strerror or e})")
    return list(dict.fromkeys(found["infos"]))


def listen_address(host: str) -> str:
    """Check that this machine can listen on `host` (resolved, then a test bind of each address on
    any port: nothing is sent anywhere) and return the host to announce in the URL, one a browser on
    this machine opens (127.0.0.1 / [::1] for a wildcard, brackets for IPv6). Raises HostError for an
    empty, invalid, unresolvable or unbindable `host`, and for a name that resolves to a wildcard:
    only an explicit 0.0.0.0 or :: listens on every interface, with a warning (as does an address
    other than loopback: reachable from its network)."""
    literal = _ip_literal(host)
    bound, failures = [], []
    for family, kind, proto, _, sockaddr in _resolve(host, literal):
        try:
            with socket.socket(family, kind, proto) as s:
                if family == socket.AF_INET6:
                    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # as asyncio's server does
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind((sockaddr[0], 0, *sockaddr[2:]))
            bound.append(ipaddress.ip_address(sockaddr[0].split("%")[0]))
        except OSError as e:
            failures.append((sockaddr[0], e))
    if failures and (not bound or any(e.errno != errno.EADDRNOTAVAIL for _, e in failures)):
        address, e = failures[0]
        raise HostError(f"--host {host}: cannot listen on {address} ({e.strerror or e}); give an address of "
                        "this machine (127.0.0.1: this machine only)")
    if any(a.is_unspecified for a in bound):
        if literal is None or not literal.is_unspecified:
            raise HostError(f"--host {host} resolves to a wildcard address: give 0.0.0.0 or :: to listen on "
                            "every interface")
        log.warning("--host %s: listening on every IPv%d interface: anyone who can reach this machine can view "
                    "the scene", host, literal.version)
        return "127.0.0.1" if literal.version == 4 else "[::1]"
    outside = sorted(str(a) for a in bound if not a.is_loopback)
    if outside:
        log.warning("--host %s: listening on %s: reachable from other machines on that network", host,
                    ", ".join(outside))
    return f"[{host}]" if literal is not None and literal.version == 6 else host
