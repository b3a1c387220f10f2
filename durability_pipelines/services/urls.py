"""Service URLs: parsing without guessing, validation with the fix in the message, masking, rewriting."""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import quote, unquote, urlsplit, urlunsplit

from durability_pipelines.services.errors import (
    _MASK,
    _MIN_SECRET_LEN,
    DAGSTER_URL_SCHEME,
    InvalidServiceURLError,
)

_SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*://)(.*)$", re.DOTALL)
_KV_PASSWORD_RE = re.compile(r"(\bpassword\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)
_QUERY_PASSWORD_RE = re.compile(r"([?&](?:password|pass|pwd|sentinel_password)=)[^&#]*", re.IGNORECASE)
_BAD_PERCENT_RE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_HOSTPORT_RE = re.compile(r"^(\[[^\[\]]*\]|[^\[\]:]*)(?::(\d*))?$")

_TOO_MANY_AT = "more than one '@' before the host"
_DELIMITER_IN_USERINFO = "a '/', '?' or '#' before the '@' that ends the user name and password"
_BAD_PERCENT = "a '%' that does not start a %XX escape"
_ENCODE_HOW = (
    "percent-encode the user name and the password (urllib.parse.quote(password, safe='') turns "
    "'@' into %40, ':' into %3A, '/' into %2F and '%' into %25), e.g. "
    "python3 -c \"import getpass, urllib.parse; print(urllib.parse.quote(getpass.getpass(), safe=''))\""
)


@dataclass(frozen=True)
class _SplitURL:
    """A URL cut the way a careful reader would: ``scheme``, raw ``userinfo``, ``hostport``, ``tail``.

    ``problem`` says why the userinfo is ambiguous (drivers would cut it elsewhere), else ``None``.
    """

    scheme: str
    userinfo: str | None
    hostport: str
    tail: str
    problem: str | None

    @property
    def base_scheme(self) -> str:
        """``postgresql+psycopg2://`` → ``postgresql``."""
        return self.scheme[:-3].split("+", 1)[0].lower()


def _first_delimiter(text: str) -> int:
    positions = [pos for pos in (text.find(ch) for ch in "/?#") if pos != -1]
    return min(positions, default=len(text))


def _split_url(url: str) -> _SplitURL | None:
    """Split ``url`` (``None`` if it is not ``scheme://…``) and detect a userinfo drivers would misread.

    libpq ends the userinfo at the *first* ``@``, Python's ``urlsplit`` and redis-py at the last, and
    both end the authority at the first ``/``, ``?`` or ``#``: a password holding one of these
    characters unencoded makes them disagree, or turns part of it into a host, port or path.
    """
    match = _SCHEME_RE.match(url)
    if match is None:
        return None
    scheme, rest = match.groups()
    end = _first_delimiter(rest)
    netloc, tail = rest[:end], rest[end:]
    if "@" in tail and _delimiter_in_userinfo(scheme, netloc, tail):
        # The password holds a delimiter: the userinfo really ends at the last '@' (masks more, never less).
        cut = rest.rfind("@")
        userinfo, after = rest[:cut], rest[cut + 1 :]
        end = _first_delimiter(after)
        return _SplitURL(scheme, userinfo, after[:end], after[end:], _DELIMITER_IN_USERINFO)
    if "@" not in netloc:
        return _SplitURL(scheme, None, netloc, tail, None)
    userinfo, _, hostport = netloc.rpartition("@")
    problem = None
    if "@" in userinfo:
        problem = _TOO_MANY_AT
    elif _BAD_PERCENT_RE.search(userinfo):
        problem = _BAD_PERCENT
    return _SplitURL(scheme, userinfo, hostport, tail, problem)


def _delimiter_in_userinfo(scheme: str, netloc: str, tail: str) -> bool:
    """True if an ``@`` after the authority's end can only be the end of a password holding ``/?#``."""
    if "@" not in netloc and _looks_like_broken_userinfo(netloc):
        return True  # e.g. redis://:pa/ss@host — netloc ":pa"
    path_end = min([p for p in (tail.find("?"), tail.find("#")) if p != -1], default=len(tail))
    path, rest = tail[:path_end], tail[path_end:]
    if "@" in path and not scheme.lower().startswith("unix"):
        return True  # a database name / db number never holds a raw '@'; a socket path may
    query, _, fragment = rest.partition("#")
    if "@" in fragment:
        return True
    # A query item is key=value; an '@' before any '=' is a password's tail, not a value (a@b).
    return any("@" in item.split("=", 1)[0] for item in query.lstrip("?").split("&"))


def _looks_like_broken_userinfo(netloc: str) -> bool:
    """True if ``netloc`` (cut at a delimiter, no ``@``) looks like ``user:partial-password``."""
    if netloc.startswith(":"):
        return True
    if ":" not in netloc or netloc.startswith("["):
        return False
    port = netloc.rsplit(":", 1)[1]
    return bool(port) and not port.isdigit()


def mask_url(url: str) -> str:
    """Return ``url`` with any password replaced by ``***``, safe for logs and error messages.

    Handles ``scheme://user:pw@host``, ``redis://:pw@host``, ``password=`` query parameters and libpq
    ``key=value`` strings. When the userinfo is ambiguous (an unencoded ``@``, ``/``, ``?``, ``#`` or
    ``%`` in it) nobody can tell the user name from the password, so the whole userinfo becomes
    ``***``: a malformed URL never leaks more than a well-formed one.
    """
    split = _split_url(url)
    if split is None:  # libpq keyword/value string, or not a URL at all
        return _KV_PASSWORD_RE.sub(lambda m: m.group(1) + _MASK, url)
    scheme, userinfo, hostport, tail = split.scheme, split.userinfo, split.hostport, split.tail
    if userinfo is None:
        masked = f"{scheme}{hostport}{tail}"
    elif split.problem is not None:
        masked = f"{scheme}{_MASK}@{hostport}{tail}"
    elif ":" in userinfo:
        masked = f"{scheme}{userinfo.split(':', 1)[0]}:{_MASK}@{hostport}{tail}"
    else:
        masked = f"{scheme}{userinfo}@{hostport}{tail}"
    return _QUERY_PASSWORD_RE.sub(lambda m: m.group(1) + _MASK, masked)


def url_secrets(url: str | None) -> set[str]:
    """The strings of ``url`` that must never be printed: the password (raw and decoded), a
    ``password=`` parameter, and the whole user name and password when the userinfo is ambiguous."""
    if not url:
        return set()
    found: set[str] = set()
    split = _split_url(url)
    if split is None:
        found.update(m.group(2).strip("'") for m in _KV_PASSWORD_RE.finditer(url))
    else:
        if split.userinfo:
            user, sep, password = split.userinfo.partition(":")
            pieces = [split.userinfo, user, password] if split.problem else [password] if sep else []
            found.update(piece for raw in pieces for piece in (raw, unquote(raw)))
        found.update(m.group(0).split("=", 1)[1] for m in _QUERY_PASSWORD_RE.finditer(split.tail))
    return {s for s in found if len(s) >= _MIN_SECRET_LEN}


def _origin(source: str | None) -> str | None:
    """How to name where a URL came from: ``$VARIABLE`` for environment variables, ``--flag`` as is."""
    if not source:
        return None
    return source if source.startswith("-") else f"${source}"


def _invalid(url: str, kind: str, source: str | None, why: str, fix: str) -> InvalidServiceURLError:
    origin = _origin(source)
    masked = mask_url(url)
    what = f"a valid {kind} URL"
    lead = f"{origin} is not {what} ({masked})" if origin else f"{masked} is not {what}"
    where = f" in {origin}" if origin else ""
    return InvalidServiceURLError(
        f"{lead}: {why}; no connection was attempted. To fix{where}: {fix}.", source=source, masked_url=masked
    )


def _check_split(url: str, split: _SplitURL, kind: str, source: str | None, *, multi_host: bool) -> None:
    """Raise :class:`InvalidServiceURLError` for an ambiguous userinfo or a host:port that is not one."""
    if split.problem is not None:
        raise _invalid(url, kind, source, f"its user name or password holds {split.problem}", _ENCODE_HOW)
    hosts = split.hostport.split(",") if multi_host else [split.hostport]
    for hostport in hosts:
        match = _HOSTPORT_RE.match(hostport)
        if match is None or (match.group(2) and not 0 < int(match.group(2)) <= 65535):
            why = "the host:port part is not a host name followed by an optional port number"
            fix = ("write host:port (port 1-65535, IPv6 addresses in [brackets]); if a ':' or '@' belongs "
                   f"to the password, {_ENCODE_HOW}")
            raise _invalid(url, kind, source, why, fix)


def validate_postgres_url(url: str, *, source: str | None = None) -> None:
    """Refuse, before any connection, a PostgreSQL URL that cannot be what the user meant.

    ``source`` names where the URL came from (an environment variable, or a ``--flag``) for the message.
    """
    from psycopg import ProgrammingError
    from psycopg.conninfo import conninfo_to_dict

    kind = "PostgreSQL"
    split = _split_url(url)
    if split is not None:
        if split.base_scheme not in ("postgresql", "postgres"):
            raise _invalid(url, kind, source, "its scheme is not postgresql://",
                           "use postgresql://host:5432/database, with user:password@ before the host")
        _check_split(url, split, kind, source, multi_host=True)
    try:
        params = conninfo_to_dict(libpq_url(url))
    except (ProgrammingError, ValueError) as exc:
        # libpq quotes the offending token: after the checks above that is never the userinfo of a URL,
        # but in a key=value string it may be a password, so it is shown for URLs only.
        why = f"libpq cannot parse it ({scrub_secrets(str(exc).strip(), url)})" if split else "libpq cannot parse it"
        fix = ("use postgresql://host:5432/database?sslmode=require, with user:password@ before the host; "
               f"{_ENCODE_HOW}")
        raise _invalid(url, kind, source, why, fix) from None
    _check_multi_host(url, params, kind, source)


def postgres_hosts(url: str) -> list[str]:
    """Every ``host[:port]`` a PostgreSQL URL or conninfo names, in libpq's order (one for a plain URL)."""
    from psycopg.conninfo import conninfo_to_dict

    params = conninfo_to_dict(libpq_url(url))
    hosts = _split_list(params.get("host") or params.get("hostaddr") or "")
    ports = _split_list(params.get("port") or "")
    if not hosts:
        return [f"localhost:{ports[0] if ports else 5432}"]
    if len(ports) == 1:
        ports = ports * len(hosts)
    return [f"{h}:{ports[i]}" if i < len(ports) and ports[i] else h for i, h in enumerate(hosts)]


def _split_list(value: object) -> list[str]:
    return [item.strip() for item in str(value).split(",")] if value else []


def _check_multi_host(url: str, params: dict[str, object], kind: str, source: str | None) -> None:
    """A URL naming several hosts must pin the session to the primary, and give one port or one per host.

    libpq tries the hosts in order and, with the default ``target_session_attrs=any``, keeps the first
    that answers: after a failover (or simply after a reconnect) that may be the standby, where every
    write fails with "cannot execute ... in a read-only transaction" and the consumers stop.
    """
    hosts = _split_list(params.get("host") or params.get("hostaddr") or "")
    if len(hosts) < 2:
        return
    ports = _split_list(params.get("port") or "")
    if len(ports) > 1 and len(ports) != len(hosts):
        raise _invalid(url, kind, source, f"it names {len(hosts)} hosts but {len(ports)} ports",
                       "give one port for all hosts or one port per host, in the same order")
    attrs = str(params.get("target_session_attrs") or "any")
    if attrs not in ("read-write", "primary"):
        why = (f"it names {len(hosts)} hosts with target_session_attrs={attrs}, so a reconnect may land on a "
               "standby, where every checkpoint save and sink write fails as read-only")
        sep = "&" if _has_query(url) else "?"
        fix = ("add target_session_attrs=read-write (libpq then skips standbys and connects to whichever host "
               f"accepts writes): {sep}target_session_attrs=read-write at the end of a postgresql:// URL, or "
               "' target_session_attrs=read-write' in a key=value string")
        raise _invalid(url, kind, source, why, fix)


def _has_query(url: str) -> bool:
    """True if a ``scheme://`` URL already has a ``?query`` (a key=value string never has)."""
    split = _split_url(url)
    return split is not None and "?" in split.tail


def validate_redis_url(url: str, *, source: str | None = None) -> None:
    """Refuse, before any connection, a Redis URL that cannot be what the user meant.

    ``redis+sentinel://`` URLs (see :mod:`durability_pipelines.redis_client`) are checked for their
    sentinel list, master name and database.
    """
    from redis.connection import parse_url

    from durability_pipelines.redis_client import (
        CLUSTER_FORM,
        SENTINEL_FORM,
        ClusterURLError,
        SentinelURLError,
        parse_cluster_url,
        parse_sentinel_url,
    )

    kind = "Redis"
    fix = ("use redis://host:port/db (rediss:// for TLS, unix:///path/to/redis.sock for a socket, "
           f"{SENTINEL_FORM} for a Sentinel-managed master, {CLUSTER_FORM} for a Redis Cluster), "
           "with [user]:password@ before the host")
    split = _split_url(url)
    multi_host_forms = {  # scheme -> (what it is, its parser, the parser's error, the form to quote)
        "redis+cluster://": ("Redis Cluster", parse_cluster_url, ClusterURLError, CLUSTER_FORM),
        "redis+sentinel://": ("Redis Sentinel", parse_sentinel_url, SentinelURLError, SENTINEL_FORM),
    }
    if split is not None and split.scheme.lower() in multi_host_forms:
        what, parse, error, form = multi_host_forms[split.scheme.lower()]
        _check_split(url, split, what, source, multi_host=True)
        try:
            parse(url)
        except error as exc:  # its message never quotes the userinfo
            why = str(exc).split(". Expected ", 1)[0].removeprefix(f"not a valid {what} URL: ")
            raise _invalid(url, what, source, why, f"use {form}") from None
        return
    if split is None or split.scheme.lower() not in ("redis://", "rediss://", "unix://"):
        raise _invalid(url, kind, source,
                       "its scheme is not redis://, rediss://, unix://, redis+sentinel:// or redis+cluster://", fix)
    _check_split(url, split, kind, source, multi_host=False)
    try:
        parse_url(url)
    except ValueError:  # the parser's message may quote part of the URL: not shown
        raise _invalid(url, kind, source, "redis-py cannot parse it", f"{fix}; {_ENCODE_HOW}") from None


def libpq_url(url: str) -> str:
    """Drop a SQLAlchemy driver suffix (``postgresql+psycopg2://`` → ``postgresql://``) for psycopg.

    Only the scheme is rewritten, the rest is kept byte for byte (``urlunsplit`` would turn
    ``postgresql:///db?host=/tmp`` into ``postgresql:/db``); libpq keyword strings pass unchanged.
    """
    return _sqlalchemy_hosts_to_libpq(_with_scheme(url, "postgresql"))


def _sqlalchemy_hosts_to_libpq(url: str) -> str:
    """``?host=h1:p1&host=h2:p2`` (SQLAlchemy's multi-host form) → ``?host=h1,h2&port=p1,p2`` (libpq's).

    libpq keeps only the last of repeated parameters and would take ``h2:p2`` for a host name, so a
    ``DAGSTER_POSTGRES_URL`` written for SQLAlchemy must be translated before psycopg connects with it.
    """
    split = _split_url(url)
    if split is None or "?" not in split.tail:
        return url
    path, _, rest = split.tail.partition("?")
    query, hash_, fragment = rest.partition("#")
    items = [item for item in query.split("&") if item]
    hosts = [unquote(item.split("=", 1)[1]) for item in items if item.startswith("host=")]
    with_port = [h for h in hosts if not h.startswith("/") and re.search(r":\d+$", h)]
    if len(hosts) < 2 and not with_port:
        return url
    names, ports = [], []
    for host in hosts:
        name, sep, port = host.rpartition(":") if re.search(r":\d+$", host) and not host.startswith("/") else ("", "", "")
        names.append(name if sep else host)
        ports.append(port)
    others = [item for item in items if not item.startswith(("host=", "port="))]
    libpq = [f"host={','.join(quote(n, safe='[]:/') for n in names)}"]
    if any(ports):
        libpq.append(f"port={','.join(ports)}")
    tail = f"{path}?{'&'.join(libpq + others)}" + (f"#{fragment}" if hash_ else "")
    userinfo = f"{split.userinfo}@" if split.userinfo is not None else ""
    return f"{split.scheme}{userinfo}{split.hostport}{tail}"


def dagster_storage_url(url: str) -> str:
    """Return ``url`` with the ``postgresql+psycopg2`` scheme that ``dagster_home/dagster.yaml`` needs.

    A URL with one host only changes its scheme. SQLAlchemy cannot parse libpq's ``h1:p1,h2:p2`` host
    list nor a key=value string, so several hosts (either form) become SQLAlchemy's own multi-host
    form, ``postgresql+psycopg2://user:pw@/db?host=h1:p1&host=h2:p2&target_session_attrs=read-write``,
    which its psycopg2 dialect hands to libpq as ``host=h1,h2 port=p1,p2``.
    """
    from psycopg.conninfo import conninfo_to_dict

    split = _split_url(url)
    if split is not None and "," not in split.hostport and "host=" not in split.tail:
        return _with_scheme(url, DAGSTER_URL_SCHEME)
    params = {k: str(v) for k, v in conninfo_to_dict(libpq_url(url)).items() if v is not None}
    hosts = postgres_hosts(url) if (params.get("host") or params.get("hostaddr")) else []
    if split is not None and len(hosts) < 2:
        return _with_scheme(url, DAGSTER_URL_SCHEME)
    params.pop("host", None)
    params.pop("hostaddr", None)
    params.pop("port", None)
    user = quote(params.pop("user", ""), safe="")
    password = params.pop("password", None)
    auth = f"{user}:{quote(password, safe='')}@" if password is not None else (f"{user}@" if user else "")
    dbname = quote(params.pop("dbname", ""), safe="")
    query = [f"host={quote(h, safe=':[]')}" for h in hosts]
    query += [f"{quote(k, safe='')}={quote(v, safe='')}" for k, v in params.items()]
    return f"{DAGSTER_URL_SCHEME}://{auth}/{dbname}" + (f"?{'&'.join(query)}" if query else "")


def _with_scheme(url: str, scheme: str) -> str:
    match = _SCHEME_RE.match(url)
    if match is None or match.group(1)[:-3].split("+", 1)[0].lower() not in ("postgresql", "postgres"):
        return url
    return f"{scheme}://{match.group(2)}"


def with_database(url: str, dbname: str) -> str:
    """Return the PostgreSQL ``url`` pointing at database ``dbname``, in the form it came in.

    A URL (one host or several) gets the name percent-encoded in its path; a libpq key=value string
    gets ``dbname=`` (quoted by libpq's rules), every other keyword and every host kept.
    """
    from psycopg.conninfo import make_conninfo

    if _split_url(url) is None:
        return make_conninfo(url, dbname=dbname)
    split = _split_url(url)
    assert split is not None
    # Rebuilt by hand: urlunsplit turns postgresql:///db?host=/tmp into postgresql:/db. A ?dbname=
    # parameter would override the path in libpq, so the path alone names the database.
    _, _, rest = split.tail.partition("?")
    query, _, _ = rest.partition("#")
    query = "&".join(item for item in query.split("&") if item and not item.startswith("dbname="))
    userinfo = f"{split.userinfo}@" if split.userinfo is not None else ""
    path = "/" + quote(dbname, safe="")
    return f"{split.scheme}{userinfo}{split.hostport}{path}" + (f"?{query}" if query else "")


def database_of(url: str) -> str:
    """The database name in a PostgreSQL URL or key=value string (libpq defaults to the user name)."""
    from psycopg.conninfo import conninfo_to_dict

    params = conninfo_to_dict(libpq_url(url))
    return str(params.get("dbname") or params.get("user") or "postgres")


def with_redis_db(url: str, db: int) -> str:
    """Return the Redis ``url`` selecting logical database ``db`` (path ``/<db>``)."""
    return urlunsplit(urlsplit(url)._replace(path=f"/{int(db)}"))


def scrub_secrets(text: str, url: str) -> str:
    """Remove the URL's secrets from a driver's error text, in case the driver echoed them."""
    for secret in sorted(url_secrets(url), key=len, reverse=True):
        text = text.replace(secret, _MASK)
    return text.replace(url, mask_url(url))
