"""GeoIP lookups: client address -> ISO 3166-1 alpha-2 country, from a MaxMind DB file.

Rule: opening reads the disk, so it happens in a worker thread (``await GeoDatabase.open``) or
outside any event loop (``open_sync``); a lookup after that is a synchronous, non-awaiting read
of the memory-mapped file through the ``maxminddb`` C extension, behind a bounded LRU.

Schemas read (chosen from ``metadata().database_type``, falling back to the record's shape):

* ``geoip2``: MaxMind GeoIP2/GeoLite2 Country, City and Enterprise, DB-IP's GeoIP2-compatible
  lite databases: ``record["country"]["iso_code"]``.
* ``country_code``: the ip-location-db builds (embedded DB-IP, ``country ipvAll``):
  ``record["country_code"]``.
* ``shape``: any other database_type; each record is read by whichever shape it has.

Only ``country`` is used, never ``registered_country`` or ``represented_country``: residency
follows where the client is, not where its provider registered the block.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import os
import re
import stat
from collections.abc import Callable
from ipaddress import IPv4Address, IPv4Network, IPv6Address, IPv6Network, ip_address
from typing import Any

import maxminddb

__all__ = [
    "DEFAULT_CACHE_SIZE",
    "GeoDatabase",
    "GeoDatabaseError",
    "GeoSchema",
    "LookupCounts",
    "is_special_purpose",
]

DEFAULT_CACHE_SIZE = 65536  # lookups remembered per database, about 10 MB at most

# Documentation ranges, spelled out because CPython's is_private/is_global lists have changed
# between releases (gh-113171): RFC 5737 (IPv4), RFC 3849 and RFC 9637 (IPv6).
_DOCUMENTATION_V4 = tuple(
    IPv4Network(n) for n in ("192.0.2.0/24", "198.51.100.0/24", "203.0.113.0/24")
)
_DOCUMENTATION_V6 = tuple(IPv6Network(n) for n in ("2001:db8::/32", "3fff::/20"))

# database_type words of MaxMind/DB-IP products that carry no country (Anonymous-IP, ASN,
# ISP, Domain, Connection-Type, IP-Risk): opening one as a country database is a config error.
_NOT_COUNTRY_WORDS = frozenset({"anonymous", "asn", "isp", "domain", "connection", "risk"})
_COUNTRY_WORDS = frozenset({"country", "city", "enterprise"})
_COUNTRY_CODE_TYPE = re.compile(r"country ipv(?:4|6|all)", re.IGNORECASE)


class GeoDatabaseError(Exception):
    """A GeoIP database could not be opened or used.

    Rendered ``"<path>: <reason>"``, e.g. ``"geodb/x.mmdb: no such file"``; a config or startup
    error for the operator, never sent to a client.

    Attributes:
        path: the database path as configured.
        reason: what is wrong, in words an operator can act on.
    """

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason


class LookupCounts:
    """Lookups by result, for ``geogate_geoip_lookups_total`` (read at scrape time).

    Plain integers bumped on the loop thread: cheaper on the request path than a Prometheus
    child, and one instance can outlive a database reload so the counter never goes back.

    Attributes:
        found: the address has a country.
        not_found: not in the database, or its record has no country.
        special: a special-purpose address (private, loopback, documentation, ...): no read.
        error: the lookup raised (closed or corrupt database).
    """

    __slots__ = ("error", "found", "not_found", "special")

    def __init__(self) -> None:
        self.found = self.not_found = self.special = self.error = 0

    def as_dict(self) -> dict[str, int]:
        """``{"found": n, "not_found": n, "special": n, "error": n}``."""
        return {
            "found": self.found,
            "not_found": self.not_found,
            "special": self.special,
            "error": self.error,
        }


class GeoSchema(enum.StrEnum):
    """Where a database keeps the country code (see the module docstring)."""

    GEOIP2 = "geoip2"
    COUNTRY_CODE = "country_code"
    SHAPE = "shape"


def is_special_purpose(ip: IPv4Address | IPv6Address) -> bool:
    """Tell whether an address can have no country, so that no database read is needed.

    True for the special-purpose blocks that are not globally reachable (RFC 6890 and the IANA
    special-purpose registries: private, shared 100.64/10, loopback, link-local, unspecified,
    benchmarking, reserved 240/4, ULA, IPv4-mapped), documentation (RFC 5737, RFC 3849,
    RFC 9637), multicast and IPv6 site-local (RFC 3879). Python's ``is_global`` alone misses
    multicast (224/4 and ff00::/8 are "global" to it) and site-local fec0::/10.

    Args:
        ip: the address, IPv4-mapped IPv6 already unwrapped (else ``::ffff:8.8.8.8`` counts as
            special, since ::ffff:0:0/96 is in Python's private list).

    Returns:
        True when the address gets no country.
    """
    if ip.is_multicast or ip.is_reserved or not ip.is_global:
        return True
    if ip.version == 4:
        return any(ip in net for net in _DOCUMENTATION_V4)
    return ip.is_site_local or any(ip in net for net in _DOCUMENTATION_V6)


def _country_code(value: Any) -> str | None:
    """Validate a code from the database: two ASCII letters, upper-cased; anything else None."""
    if value.__class__ is str and len(value) == 2 and value.isascii() and value.isalpha():
        return value.upper()
    return None


def _country_by_shape(record: Any) -> str | None:
    """Country of a record of either shape (or IPinfo's flat ``{"country": "US"}``)."""
    if record.__class__ is not dict:
        return None
    country = record.get("country")
    if country.__class__ is dict:
        return _country_code(country.get("iso_code"))
    if country is not None:
        return _country_code(country)
    return _country_code(record.get("country_code"))


def _country_geoip2(record: Any) -> str | None:
    country = record.get("country") if record.__class__ is dict else None
    if country.__class__ is dict:
        return _country_code(country.get("iso_code"))
    return _country_by_shape(record)


def _country_flat(record: Any) -> str | None:
    code = record.get("country_code") if record.__class__ is dict else None
    if code is not None:
        return _country_code(code)
    return _country_by_shape(record)


_EXTRACTORS: dict[GeoSchema, Callable[[Any], str | None]] = {
    GeoSchema.GEOIP2: _country_geoip2,
    GeoSchema.COUNTRY_CODE: _country_flat,
    GeoSchema.SHAPE: _country_by_shape,
}


def _schema_for(path: str, database_type: str) -> GeoSchema:
    """Pick the schema from ``database_type``; refuse databases that hold no country."""
    words = set(re.split(r"[^a-z0-9]+", database_type.lower()))
    if _COUNTRY_CODE_TYPE.fullmatch(database_type.strip()):
        return GeoSchema.COUNTRY_CODE
    if words & _COUNTRY_WORDS:
        return GeoSchema.GEOIP2
    if words & _NOT_COUNTRY_WORDS:
        raise GeoDatabaseError(
            path,
            f"database_type {database_type!r} holds no country data; "
            "use a Country or City database (GeoIP2, GeoLite2 or DB-IP)",
        )
    return GeoSchema.SHAPE


class GeoDatabase:
    """An open MaxMind DB file answering ``lookup(ip) -> country``.

    Open with ``await GeoDatabase.open(path)`` in the server (the disk is touched in a worker
    thread) or ``GeoDatabase.open_sync(path)`` outside an event loop (CLI, config check).
    To reload, open the new file, swap the reference, then ``close()`` the old one: lookups
    never await, so no request can be half-way through the old database on the loop thread.

    Attributes:
        path: the file path as given.
        database_type: metadata ``database_type``, e.g. ``"GeoIP2-City"``, ``"country ipvAll"``.
        schema: the GeoSchema used to read records.
        build_epoch: metadata build time, in seconds since the Unix epoch.
        node_count: search tree nodes (metadata), a rough size of the database.
        ip_version: 4 or 6 (a 6 database answers IPv4 too).
        size_bytes: file size when opened, in bytes.
        counts: lookups by result (LookupCounts), shared across reloads when passed in.
    """

    __slots__ = (
        "_lookup",
        "_lru",
        "_reader",
        "build_epoch",
        "counts",
        "database_type",
        "ip_version",
        "node_count",
        "path",
        "schema",
        "size_bytes",
    )

    def __init__(
        self,
        reader: Any,
        *,
        path: str,
        size_bytes: int,
        cache_size: int = DEFAULT_CACHE_SIZE,
        counts: LookupCounts | None = None,
    ) -> None:
        """Wrap an open ``maxminddb`` reader; use ``open`` or ``open_sync`` instead.

        Raises:
            GeoDatabaseError: the database holds no country data (``database_type``).
            ValueError: ``cache_size`` is negative.
        """
        if cache_size < 0:
            raise ValueError(f"cache_size must be >= 0, got {cache_size}")
        meta = reader.metadata()
        self.path = path
        self.database_type: str = meta.database_type
        self.schema = _schema_for(path, self.database_type)
        self.build_epoch: int = int(meta.build_epoch)
        self.node_count: int = int(meta.node_count)
        self.ip_version: int = int(meta.ip_version)
        self.size_bytes = size_bytes
        self.counts = counts if counts is not None else LookupCounts()
        self._reader = reader
        self._lru = functools.lru_cache(maxsize=cache_size)(
            _make_resolver(reader, _EXTRACTORS[self.schema], ipv4_only=self.ip_version == 4)
        )
        self._lookup: Callable[[IPv4Address | IPv6Address], str | None] = self._lru

    @classmethod
    async def open(
        cls,
        path: str | os.PathLike[str],
        *,
        cache_size: int = DEFAULT_CACHE_SIZE,
        counts: LookupCounts | None = None,
    ) -> GeoDatabase:
        """Open a database without blocking the event loop (file work runs in a thread).

        Args:
            path: the ``.mmdb`` file.
            cache_size: lookups remembered in the LRU; 0 disables it.
            counts: where lookups are counted; pass the old database's on reload.

        Returns:
            The open GeoDatabase.

        Raises:
            GeoDatabaseError: missing or unreadable file, not a MaxMind DB, or a database
                without country data (e.g. GeoIP2-Anonymous-IP).
        """
        return await asyncio.to_thread(cls.open_sync, path, cache_size=cache_size, counts=counts)

    @classmethod
    def open_sync(
        cls,
        path: str | os.PathLike[str],
        *,
        cache_size: int = DEFAULT_CACHE_SIZE,
        counts: LookupCounts | None = None,
    ) -> GeoDatabase:
        """Open a database, blocking; for use outside an event loop (CLI, config check).

        The file is ``stat``-ed first: it must be a regular, non-empty file (a FIFO would
        hang the open; a directory gives a vaguer error from libmaxminddb).

        Args:
            path: the ``.mmdb`` file.
            cache_size: lookups remembered in the LRU; 0 disables it.
            counts: where lookups are counted; a new LookupCounts when None.

        Returns:
            The open GeoDatabase.

        Raises:
            GeoDatabaseError: missing or unreadable file, not a MaxMind DB, or a database
                without country data (e.g. GeoIP2-Anonymous-IP).
        """
        name = os.fspath(path)
        try:
            st = os.stat(name)
        except FileNotFoundError:
            raise GeoDatabaseError(name, "no such file") from None
        except OSError as exc:
            raise GeoDatabaseError(name, f"cannot read: {exc.strerror or exc}") from None
        except ValueError as exc:  # embedded NUL byte
            raise GeoDatabaseError(name, f"invalid path: {exc}") from None
        if stat.S_ISDIR(st.st_mode):
            raise GeoDatabaseError(name, "is a directory, not a MaxMind DB file")
        if not stat.S_ISREG(st.st_mode):
            raise GeoDatabaseError(name, "not a regular file")
        if st.st_size == 0:
            raise GeoDatabaseError(name, "empty file, not a MaxMind DB")
        try:
            reader = maxminddb.open_database(name, maxminddb.MODE_AUTO)
        except maxminddb.InvalidDatabaseError:
            raise GeoDatabaseError(name, "not a MaxMind DB file (no valid metadata)") from None
        except OSError as exc:
            raise GeoDatabaseError(name, f"cannot read: {exc.strerror or exc}") from None
        try:
            return cls(
                reader, path=name, size_bytes=st.st_size, cache_size=cache_size, counts=counts
            )
        except BaseException:
            reader.close()
            raise

    def lookup(self, ip: IPv4Address | IPv6Address | str) -> str | None:
        """Return the client's country; synchronous, for the per-request path.

        IPv4-mapped IPv6 is unwrapped first (RFC 4291 §2.5.5.2); special-purpose addresses
        (``is_special_purpose``) get None without a database read. Answers, None included,
        are kept in a bounded LRU keyed by the address object. Every call is counted in
        ``counts`` by result, LRU hits included.

        Args:
            ip: an address object (as ``gateway.forwarded`` gives), or its text form.

        Returns:
            ISO 3166-1 alpha-2 code such as ``"DE"``, or None: special-purpose address, not in
            the database, or a record without a country (e.g. an anycast block).

        Raises:
            ValueError: ``ip`` is a string that is not an IP address.
            GeoDatabaseError: the database was closed.
        """
        if isinstance(ip, str):
            ip = ip_address(ip)
        try:
            country = self._lookup(ip)
        except Exception:
            self.counts.error += 1
            raise
        if country:
            self.counts.found += 1
            return country
        if country is None:
            self.counts.not_found += 1
        else:  # "": the resolver's mark for a special-purpose address
            self.counts.special += 1
        return None

    def cache_info(self) -> functools._CacheInfo:
        """LRU statistics: hits, misses, maxsize, currsize (for metrics and tests)."""
        return self._lru.cache_info()

    def close(self) -> None:
        """Release the file; later lookups raise GeoDatabaseError. Idempotent."""
        self._lookup = self._closed
        self._lru.cache_clear()
        self._reader.close()

    def _closed(self, ip: IPv4Address | IPv6Address) -> str | None:
        raise GeoDatabaseError(self.path, "database is closed")

    def __enter__(self) -> GeoDatabase:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        info = self._lru.cache_info()
        state = " closed" if self._lookup is not self._lru else ""
        return (
            f"<GeoDatabase {self.path} type={self.database_type!r} schema={self.schema}"
            f"{state} cache hits={info.hits} misses={info.misses}"
            f" size={info.currsize}/{info.maxsize}>"
        )


def _make_resolver(
    reader: Any, extract: Callable[[Any], str | None], *, ipv4_only: bool
) -> Callable[[IPv4Address | IPv6Address], str | None]:
    """The uncached lookup, a closure so the LRU holds no reference to the GeoDatabase.

    It answers ``""`` (not None) for a special-purpose address, so that ``lookup`` can count
    those apart from addresses the database does not know, without a second check.
    """
    get = reader.get

    def resolve(ip: IPv4Address | IPv6Address) -> str | None:
        if ip.version == 6:
            mapped = ip.ipv4_mapped
            if mapped is not None:
                ip = mapped
            elif ipv4_only:  # the reader raises ValueError for IPv6 in an IPv4-only tree
                return None
        if is_special_purpose(ip):
            return ""
        record = get(ip)
        return None if record is None else extract(record)

    return resolve
