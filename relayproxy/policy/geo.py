"""The country of a client address, from a MaxMind-format (MMDB) database the admin provides.

GeoIP2/GeoLite2 Country and City databases, and other MMDBs in their layout (DB-IP, IPinfo's
country files), keep the ISO code at country.iso_code; registered_country is where the address
block is registered, the best guess left when the country where it is used is unknown.
"""

from __future__ import annotations

import ipaddress
import logging
from typing import Any

import maxminddb

log = logging.getLogger("relayproxy.policy.geo")


class CountryDB:
    """ISO country of an IP address from a MaxMind-format database the admin provides."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            # MODE_AUTO: the C extension over mmap when installed, so a lookup is a few
            # microseconds and never worth a thread; the pure-Python reader otherwise.
            self._reader = maxminddb.open_database(path, maxminddb.MODE_AUTO)
        except OSError as exc:  # its text would show the path again, as bytes
            raise ValueError(f"cannot open {path}: {exc.strerror or exc}") from exc
        except (ValueError, maxminddb.InvalidDatabaseError) as exc:
            raise ValueError(f"cannot open {path}: {exc}") from exc
        self._ipv6 = self._reader.metadata().ip_version == 6

    def country(self, ip: str) -> str | None:
        """ISO 3166-1 alpha-2 code, upper case ("DE"); None when the database does not know."""
        try:
            address = ipaddress.ip_address(ip)
        except ValueError:
            return None
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
            # a dual-stack listener's view of an IPv4 client: databases without the
            # ::ffff:0:0/96 alias would not find it
            address = address.ipv4_mapped
        if address.version == 6 and not self._ipv6:
            return None  # an IPv4-only database knows no IPv6 address
        try:
            record = self._reader.get(address)
        except maxminddb.InvalidDatabaseError as exc:
            log.warning("country database %s: lookup of %s failed: %s", self.path, ip, exc)
            return None
        if not isinstance(record, dict):
            return None
        return _iso_code(record.get("country")) or _iso_code(record.get("registered_country"))

    def close(self) -> None:
        self._reader.close()


def _iso_code(place: Any) -> str | None:
    code = place.get("iso_code") if isinstance(place, dict) else None
    if isinstance(code, str) and len(code) == 2 and code.isascii() and code.isalpha():
        return code.upper()
    return None
