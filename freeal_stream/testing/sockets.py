"""Which TCP ports processes listen on, and whether an address is loopback: how tests and benchmarks check
that nothing a job or a cluster starts can be reached from beyond this machine."""

from __future__ import annotations

import ipaddress

import psutil


def is_loopback(ip: str) -> bool:
    """True for 127.0.0.0/8, ::1 and their IPv4-mapped forms (a dual-stack socket shows ::ffff:127.0.0.1)."""
    address = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback


def listening(procs: list[psutil.Process]) -> set[tuple[str, str, int]]:
    """(process name, address, port) of every listening TCP socket of `procs` (ones gone are skipped)."""
    found = set()
    for p in procs:
        try:
            name = p.name()
            for c in p.net_connections(kind="tcp"):
                if c.status == psutil.CONN_LISTEN:
                    found.add((name, c.laddr.ip, c.laddr.port))
        except psutil.Error:
            continue
    return found
