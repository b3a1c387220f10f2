"""Configured server URLs: malformed ones are refused before connecting, refused credentials are not
"unreachable", and no message, repr or traceback shows any part of the user name or password.

Real servers only: a private PostgreSQL with ``scram-sha-256`` and a private Redis with ``requirepass``
(the shared servers trust every password), and a bare TCP listener that proves nothing connected.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import quote, urlsplit

import pytest

from durability_pipelines import services
from durability_pipelines.checkpoints.errors import ConfigError
from tests.support.servers import PrivatePostgres, PrivateRedis

REPO = Path(__file__).resolve().parent.parent
USER = "opsadmin"
# Every fragment a driver could mistake for a host, port or path is >= 3 characters and distinctive.
PASSWORDS = {
    "at": "Sup3r@Secr3t",
    "slash": "Sup3r/Secr3t",
    "colon-slash": "Sup3r:Ho5t/Secr3t",
    "question": "Sup3r?Secr3t",
    "hash": "Sup3r#Secr3t",
    "percent": "Sup3r%Secr3t",
}
FRAGMENTS = ("Sup3r", "Secr3t", "Ho5t", USER)


@pytest.fixture
def listener() -> Iterator[tuple[int, Callable[[], bool]]]:
    """A TCP port that accepts connections without answering, and ``connected()``: did anyone come?"""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(8)
    sock.setblocking(False)

    def connected() -> bool:
        try:
            client, _ = sock.accept()
        except BlockingIOError:
            return False
        client.close()
        return True

    yield sock.getsockname()[1], connected
    sock.close()


def _raw_url(kind: str, password: str, port: int) -> str:
    if kind == "postgres":
        return f"postgresql://{USER}:{password}@127.0.0.1:{port}/app"
    return f"redis://{USER}:{password}@127.0.0.1:{port}/0"


def _assert_nothing_secret(text: str) -> None:
    for fragment in FRAGMENTS:
        assert fragment not in text, f"{fragment!r} leaked in: {text}"


# --------------------------------------------------------------------------- malformed URLs


@pytest.mark.parametrize("password", list(PASSWORDS.values()), ids=list(PASSWORDS))
@pytest.mark.parametrize("kind", ["postgres", "redis"])
def test_unencoded_password_is_refused_before_connecting_with_the_percent_encode_fix(
    monkeypatch: pytest.MonkeyPatch, listener: tuple[int, Callable[[], bool]], kind: str, password: str
) -> None:
    port, connected = listener
    env, resolve = (
        (services.ENV_POSTGRES_URL, services.resolve_postgres_url)
        if kind == "postgres"
        else (services.ENV_REDIS_URL, services.resolve_redis_url)
    )
    monkeypatch.setenv(env, _raw_url(kind, password, port))
    with pytest.raises(services.InvalidServiceURLError) as info:
        resolve(timeout=2)
    error = info.value
    assert isinstance(error, ConfigError) and not isinstance(error, services.ServiceUnavailableError)
    message = str(error)
    assert f"${env}" in message and "percent-encode" in message and "quote(password, safe='')" in message
    assert f"***@127.0.0.1:{port}" in message and error.masked_url in message and error.source == env
    assert "unreachable" not in message
    _assert_nothing_secret(message)
    _assert_nothing_secret(repr(error))
    _assert_nothing_secret("".join(traceback.format_exception(error)))
    assert not connected(), "a malformed URL must be refused before any connection"


@pytest.mark.parametrize("kind", ["postgres", "redis"])
def test_unencoded_password_is_refused_by_check_even_without_resolve(
    listener: tuple[int, Callable[[], bool]], kind: str
) -> None:
    port, connected = listener
    url = _raw_url(kind, PASSWORDS["at"], port)
    check = services.check_postgres if kind == "postgres" else services.check_redis
    with pytest.raises(services.InvalidServiceURLError) as info:
        check(url, timeout=2, source="--postgres-url" if kind == "postgres" else "--redis-url")
    assert "--postgres-url" in str(info.value) or "--redis-url" in str(info.value)
    assert "$--" not in str(info.value)
    _assert_nothing_secret(str(info.value))
    assert not connected()


def test_resolve_without_check_still_refuses_a_malformed_url(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(services.ENV_POSTGRES_URL, _raw_url("postgres", PASSWORDS["slash"], 5432))
    with pytest.raises(services.InvalidServiceURLError):
        services.resolve_postgres_url(check=False)
    monkeypatch.setenv(services.ENV_REDIS_URL, _raw_url("redis", PASSWORDS["at"], 6379))
    with pytest.raises(services.InvalidServiceURLError):
        services.resolve_redis_url(check=False)


@pytest.mark.parametrize(
    ("url", "validate"),
    [
        ("postgresql://u:pw@h:notaport/db", services.validate_postgres_url),
        ("postgresql://u:pw@h:70000/db", services.validate_postgres_url),
        ("mysql://u:pw@h/db", services.validate_postgres_url),
        ("postgresql://h/db?no_such_option=1", services.validate_postgres_url),
        ("redis://:pw@h:notaport/0", services.validate_redis_url),
        ("http://:pw@h:6379/0", services.validate_redis_url),
    ],
)
def test_other_malformed_urls_are_bad_input_too(url: str, validate: Callable[..., None]) -> None:
    with pytest.raises(services.InvalidServiceURLError, match="is not a valid") as info:
        validate(url, source="DURABILITY_X_URL")
    assert "$DURABILITY_X_URL" in str(info.value) and "pw" not in str(info.value).replace("password", "")


@pytest.mark.parametrize(
    "url",
    [
        "postgresql://ops:s3cr%40t%2F%3A@db.internal:5432/app?sslmode=require",
        "postgresql://ops:pa:ss@db.internal/app",  # ':' in a password is unambiguous (RFC 3986)
        "postgresql+psycopg2://ops@[::1]:5432/app",
        "postgresql://h1:5432,h2:5433/app?target_session_attrs=read-write",
        "postgresql://h:5432/app?application_name=a@b",
        "postgresql:///app?host=/var/run/postgresql",
        "host=db.internal user=ops password=s3cret dbname=app",
    ],
)
def test_well_formed_postgres_urls_pass_validation(url: str) -> None:
    services.validate_postgres_url(url, source=services.ENV_POSTGRES_URL)


@pytest.mark.parametrize(
    "url",
    ["redis://:s3cr%40t@h:6379/0", "rediss://default:pa:ss@cache.example.com:6380/2", "redis://h",
     "unix://:pw@/run/redis/redis.sock?db=1"],
)
def test_well_formed_redis_urls_pass_validation(url: str) -> None:
    services.validate_redis_url(url, source=services.ENV_REDIS_URL)


def test_services_command_line_reports_a_malformed_url_without_a_traceback() -> None:
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO),
           services.ENV_POSTGRES_URL: _raw_url("postgres", PASSWORDS["at"], 5432)}
    done = subprocess.run([sys.executable, "-m", "durability_pipelines.services", "urls"], env=env,
                          capture_output=True, text=True, timeout=60, cwd=str(REPO))
    assert done.returncode == 2, done.stderr
    assert "percent-encode" in done.stderr and "Traceback" not in done.stderr
    _assert_nothing_secret(done.stdout + done.stderr)


# --------------------------------------------------------------------------- refused credentials


def test_colon_in_a_redis_password_is_accepted_unencoded(
    make_private_redis: Callable[..., PrivateRedis],
) -> None:
    server = make_private_redis(password="pa:ss-word")
    services.check_redis(f"redis://:pa:ss-word@127.0.0.1:{server.port}/0", source=services.ENV_REDIS_URL)


@pytest.fixture(scope="module")
def password_postgres() -> Iterator[PrivatePostgres]:
    """One private PostgreSQL that demands a password (scram-sha-256), shared by this module's tests."""
    server = PrivatePostgres(password="R1ght@P/w")
    server.start()
    yield server
    server.close()


def test_password_postgres_accepts_the_right_percent_encoded_password(
    password_postgres: PrivatePostgres,
) -> None:
    services.check_postgres(password_postgres.url, source=services.ENV_POSTGRES_URL)


@pytest.mark.parametrize(
    "userinfo",
    [f"postgres:{quote('Wr0ng@Passw0rd', safe='')}", "postgres", f"nobody:{quote('R1ght@P/w', safe='')}"],
    ids=["wrong-password", "no-password", "no-such-role"],
)
def test_wrong_postgres_credentials_are_refused_not_unreachable(
    monkeypatch: pytest.MonkeyPatch, password_postgres: PrivatePostgres, userinfo: str
) -> None:
    monkeypatch.setenv(services.ENV_POSTGRES_URL, f"postgresql://{userinfo}@127.0.0.1:{password_postgres.port}/postgres")
    with pytest.raises(services.PostgresAuthenticationError) as info:
        services.resolve_postgres_url()
    message = str(info.value)
    assert not isinstance(info.value, services.ServiceUnavailableError)
    assert f"refused the credentials of ${services.ENV_POSTGRES_URL}" in message
    assert "check the user and password" in message and "unreachable" not in message
    for secret in ("Wr0ng", "Passw0rd", "R1ght", "%40"):
        assert secret not in message


def test_no_such_role_on_a_trust_server_is_a_credentials_error(
    monkeypatch: pytest.MonkeyPatch, postgres_admin_url: str
) -> None:
    parts = urlsplit(postgres_admin_url)
    url = f"postgresql://dp_no_such_role:x@{parts.hostname}:{parts.port or 5432}/postgres"
    monkeypatch.setenv(services.ENV_POSTGRES_URL, url)
    with pytest.raises(services.PostgresAuthenticationError, match="refused the credentials"):
        services.resolve_postgres_url()


def test_missing_database_is_refused_not_unreachable(
    monkeypatch: pytest.MonkeyPatch, postgres_admin_url: str
) -> None:
    monkeypatch.setenv(services.ENV_POSTGRES_URL, services.with_database(postgres_admin_url, "dp_no_such_db"))
    with pytest.raises(services.PostgresDatabaseMissingError, match="no database 'dp_no_such_db'") as info:
        services.resolve_postgres_url()
    assert isinstance(info.value, services.ServiceRefusedError) and "unreachable" not in str(info.value)


def test_ensure_database_reports_refused_credentials(password_postgres: PrivatePostgres) -> None:
    url = f"postgresql://postgres:Wr0ngPassw0rd@127.0.0.1:{password_postgres.port}/postgres"
    with pytest.raises(services.PostgresAuthenticationError, match="cannot create database 'x'") as info:
        services.ensure_database(url, "x")
    assert "Wr0ngPassw0rd" not in str(info.value)


@pytest.mark.parametrize(
    ("userinfo", "answer"),
    [(":Wr0ngPassw0rd", "invalid username-password pair"), ("", "Authentication required"),
     ("nobody:Wr0ngPassw0rd", "invalid username-password pair")],
    ids=["wrongpass", "noauth", "no-such-user"],
)
def test_wrong_redis_credentials_are_refused_not_unreachable(
    monkeypatch: pytest.MonkeyPatch, make_private_redis: Callable[..., PrivateRedis], userinfo: str,
    answer: str
) -> None:
    server = make_private_redis(password="R1ghtPassw0rd")
    at = f"{userinfo}@" if userinfo else ""
    monkeypatch.setenv(services.ENV_REDIS_URL, f"redis://{at}127.0.0.1:{server.port}/0")
    with pytest.raises(services.RedisAuthenticationError) as info:
        services.resolve_redis_url()
    message = str(info.value)
    assert not isinstance(info.value, services.ServiceUnavailableError)
    assert f"refused the credentials of ${services.ENV_REDIS_URL}" in message and answer in message
    assert "check the user and password" in message and "unreachable" not in message
    assert "Wr0ng" not in message and "R1ght" not in message


@pytest.mark.parametrize("kind", ["postgres", "redis"])
def test_a_port_nobody_listens_on_is_still_unreachable(monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    url = _raw_url(kind, quote(PASSWORDS["at"], safe=""), services.free_port())
    env = services.ENV_POSTGRES_URL if kind == "postgres" else services.ENV_REDIS_URL
    monkeypatch.setenv(env, url)
    resolve = services.resolve_postgres_url if kind == "postgres" else services.resolve_redis_url
    with pytest.raises(services.ServiceUnavailableError, match="is unreachable") as info:
        resolve(timeout=2)
    assert not isinstance(info.value, services.ServiceRefusedError)
    assert f"{USER}:***@" in str(info.value)  # a well-formed URL keeps its user name, never the password
    assert "Sup3r" not in str(info.value) and "Secr3t" not in str(info.value)
