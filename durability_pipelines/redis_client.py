"""One way to build a Redis client from a URL, for a single server or a Sentinel-managed master.

Every component (stores, resources, checks, CLI, demo) calls :func:`redis_client`, so that a URL that
works in ``DURABILITY_REDIS_URL`` works everywhere. ``redis.Redis.from_url`` knows ``redis://``,
``rediss://`` and ``unix://``; for Sentinel this module adds the form other Redis libraries use
(kombu's ``sentinel://``, ``redis-sentinel-url``)::

    redis+sentinel://[[user]:password@]host1:26379[,host2:26379...]/<master_name>[/<db>][?sentinel_password=...]

The user name and password are the *master's* (and its replicas'); sentinels that require a password
of their own get ``sentinel_password`` (and ``sentinel_username``). The client comes from
``Sentinel(...).master_for(master_name)``: every new connection asks the sentinels where the master
is, and a connection that finds it died or was demoted (``ReadOnlyError``) is dropped with a
``ConnectionError``, so the next command reaches the promoted master.

For Redis Cluster (cluster mode enabled: ElastiCache/MemoryDB cluster mode, a self-run cluster)::

    redis+cluster://[[user]:password@]host1:6379[,host2:6379...][/0]

The hosts are *startup nodes* (any few of the cluster's nodes; the client discovers the rest and the
slot map with ``CLUSTER SLOTS``, and follows ``MOVED`` / ``ASK`` redirections). A cluster has database 0
only. The client is a ``redis.cluster.RedisCluster``: code that must read across nodes asks
:func:`is_cluster` and uses :func:`mget_all` / the cluster-wide ``scan_iter``. No Dagster import here.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl, unquote

import redis
from redis.cluster import ClusterNode, RedisCluster
from redis.sentinel import Sentinel, SentinelConnectionPool

from durability_pipelines.checkpoints.errors import ConfigError

SENTINEL_SCHEME = "redis+sentinel"
SENTINEL_DEFAULT_PORT = 26379
SENTINEL_FORM = (
    "redis+sentinel://[[user]:password@]host1:26379[,host2:26379...]/<master_name>[/<db>]"
    "[?sentinel_password=...]"
)
_QUERY_KEYS = ("sentinel_password", "sentinel_username")
_HOSTPORT_RE = re.compile(r"^(\[[^\[\]]+\]|[^\[\]:/]+)(?::(\d+))?$")


class SentinelURLError(ConfigError, ValueError):
    """A ``redis+sentinel://`` URL that is not of the expected form; the message never holds a password."""


@dataclass(frozen=True)
class SentinelURL:
    """The parts of a ``redis+sentinel://`` URL (password decoded)."""

    sentinels: tuple[tuple[str, int], ...]
    master_name: str
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    sentinel_username: str | None = None
    sentinel_password: str | None = field(default=None, repr=False)


def is_sentinel_url(url: str) -> bool:
    """True for a ``redis+sentinel://`` URL (scheme case-insensitive)."""
    return url[: len(SENTINEL_SCHEME) + 3].lower() == f"{SENTINEL_SCHEME}://"


def _userinfo_and_hosts(netloc: str, bad: Callable[[str], Exception], default_port: int,
                        what: str) -> tuple[str | None, str | None, list[tuple[str, int]]]:
    """``[user[:password]@]host[:port][,host[:port]...]`` of a multi-host URL (password decoded)."""
    userinfo, at, hosts = netloc.rpartition("@")
    username = password = None
    if at:
        user, colon, pw = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(pw) if colon else None
    if not hosts:
        raise bad(f"no {what} host:port")
    out = []
    for hostport in hosts.split(","):
        match = _HOSTPORT_RE.match(hostport)
        if match is None:
            raise bad(f"{hostport!r} is not host[:port]")
        port = int(match.group(2)) if match.group(2) else default_port
        if not 0 < port <= 65535:
            raise bad(f"port {port} of {match.group(1)!r} is not 1-65535")
        out.append((match.group(1).strip("[]"), port))
    return username, password, out


def _bad(why: str) -> SentinelURLError:
    return SentinelURLError(f"not a valid Redis Sentinel URL: {why}. Expected {SENTINEL_FORM}")


def parse_sentinel_url(url: str) -> SentinelURL:
    """Split a ``redis+sentinel://`` URL; raises :class:`SentinelURLError` saying the expected form."""
    if not is_sentinel_url(url):
        raise _bad("the scheme is not redis+sentinel://")
    rest = url[len(SENTINEL_SCHEME) + 3 :]
    rest, _, query = rest.partition("?")
    netloc, slash, path = rest.partition("/")
    username, password, sentinels = _userinfo_and_hosts(netloc, _bad, SENTINEL_DEFAULT_PORT, "sentinel")
    parts = path.split("/") if slash else []
    if not parts or not parts[0]:
        raise _bad("no master name (the name in the sentinels' `sentinel monitor <name> ...`) after the hosts")
    if len(parts) > 2 or (len(parts) == 2 and not parts[1].isdigit()):
        raise _bad("after the master name only a database number may follow (/<master_name>/<db>)")
    db = int(parts[1]) if len(parts) == 2 else 0
    params = dict(parse_qsl(query, keep_blank_values=True))
    unknown = sorted(set(params) - set(_QUERY_KEYS))
    if unknown:
        raise _bad(f"unknown query parameter(s) {', '.join(unknown)} (known: {', '.join(_QUERY_KEYS)})")
    return SentinelURL(
        tuple(sentinels), unquote(parts[0]), db, username, password,
        params.get("sentinel_username") or None, params.get("sentinel_password") or None,
    )  # fmt: skip


CLUSTER_SCHEME = "redis+cluster"
CLUSTER_DEFAULT_PORT = 6379
CLUSTER_FORM = "redis+cluster://[[user]:password@]host1:6379[,host2:6379...][/0]"


class ClusterURLError(ConfigError, ValueError):
    """A ``redis+cluster://`` URL that is not of the expected form; the message never holds a password."""


@dataclass(frozen=True)
class ClusterURL:
    """The parts of a ``redis+cluster://`` URL (password decoded)."""

    nodes: tuple[tuple[str, int], ...]
    username: str | None = None
    password: str | None = field(default=None, repr=False)


def is_cluster_url(url: str) -> bool:
    """True for a ``redis+cluster://`` URL (scheme case-insensitive)."""
    return url[: len(CLUSTER_SCHEME) + 3].lower() == f"{CLUSTER_SCHEME}://"


def _bad_cluster(why: str) -> ClusterURLError:
    return ClusterURLError(f"not a valid Redis Cluster URL: {why}. Expected {CLUSTER_FORM}")


def parse_cluster_url(url: str) -> ClusterURL:
    """Split a ``redis+cluster://`` URL; raises :class:`ClusterURLError` saying the expected form."""
    if not is_cluster_url(url):
        raise _bad_cluster("the scheme is not redis+cluster://")
    rest = url[len(CLUSTER_SCHEME) + 3 :]
    rest, _, query = rest.partition("?")
    if query:
        raise _bad_cluster("query parameters are not supported")
    netloc, slash, path = rest.partition("/")
    username, password, nodes = _userinfo_and_hosts(netloc, _bad_cluster, CLUSTER_DEFAULT_PORT, "startup node")
    if slash and path not in ("", "0"):
        raise _bad_cluster(f"a Redis Cluster has database 0 only, the URL names /{path}")
    return ClusterURL(tuple(nodes), username, password)


def is_cluster(client: Any) -> bool:
    """True for a Redis Cluster client: keys live on several nodes, and a command (or script) that
    touches several keys must keep them in one hash slot."""
    return isinstance(client, RedisCluster)


MGET_CHUNK = 1000


def mget_all(client: Any, keys: list[Any]) -> list[Any]:
    """``MGET`` of any number of keys, in order: pipelined 1,000-key chunks on one server, one ``MGET`` per
    slot on a cluster (``mget_nonatomic``: not a snapshot across slots, which no reader here needs)."""
    if not keys:
        return []
    if is_cluster(client):
        return client.mget_nonatomic(keys)
    if len(keys) <= MGET_CHUNK:
        return client.mget(keys)
    pipe = client.pipeline(transaction=False)
    for i in range(0, len(keys), MGET_CHUNK):
        pipe.mget(keys[i : i + MGET_CHUNK])
    return [v for chunk in pipe.execute() for v in chunk]


def redis_client(url: str, **kwargs: Any) -> redis.Redis:
    """A client for ``url``: ``redis://``, ``rediss://``, ``unix://``, ``redis+sentinel://`` or
    ``redis+cluster://`` (a ``RedisCluster``, which has the same command methods).

    ``kwargs`` (``socket_timeout``, ``socket_connect_timeout``, ``decode_responses``...) apply to the
    master's (or every cluster node's) connections; the sentinels get the ``socket_*`` ones, plus their
    own credentials.
    """
    if is_cluster_url(url):
        cluster = parse_cluster_url(url)
        cluster_kwargs = dict(kwargs)
        if cluster.password is not None:
            cluster_kwargs["password"] = cluster.password
        if cluster.username is not None:
            cluster_kwargs["username"] = cluster.username
        nodes = [ClusterNode(host, port) for host, port in cluster.nodes]
        return RedisCluster(startup_nodes=nodes, **cluster_kwargs)  # type: ignore[return-value]
    if not is_sentinel_url(url):
        return redis.Redis.from_url(url, **kwargs)
    parsed = parse_sentinel_url(url)
    sentinel_kwargs: dict[str, Any] = {k: v for k, v in kwargs.items() if k.startswith("socket_")}
    if parsed.sentinel_password is not None:
        sentinel_kwargs["password"] = parsed.sentinel_password
    if parsed.sentinel_username is not None:
        sentinel_kwargs["username"] = parsed.sentinel_username
    master_kwargs = dict(kwargs, db=parsed.db)
    if parsed.password is not None:
        master_kwargs["password"] = parsed.password
    if parsed.username is not None:
        master_kwargs["username"] = parsed.username
    sentinel = Sentinel(list(parsed.sentinels), sentinel_kwargs=sentinel_kwargs)
    return sentinel.master_for(parsed.master_name, **master_kwargs)


def describe_client(client: redis.Redis) -> str:
    """Where ``client`` points, without credentials, for error messages."""
    if is_cluster(client):
        nodes = ",".join(sorted(client.nodes_manager.startup_nodes))  # type: ignore[attr-defined]
        return f"redis cluster (startup nodes {nodes})"
    pool = client.connection_pool
    kw = pool.connection_kwargs
    if isinstance(pool, SentinelConnectionPool):
        hosts = ",".join(f"{s.connection_pool.connection_kwargs.get('host', '?')}:"
                         f"{s.connection_pool.connection_kwargs.get('port', '?')}"
                         for s in pool.sentinel_manager.sentinels)
        return f"redis master {pool.service_name!r} (via sentinels {hosts}) db {kw.get('db', 0)}"
    where = kw.get("path") or f"{kw.get('host', '?')}:{kw.get('port', '?')}"
    return f"redis at {where} db {kw.get('db', 0)}"
