"""Service URL constants and the errors that tell "down", "refused" and "bad URL" apart."""

from __future__ import annotations

from durability_pipelines.checkpoints.errors import ConfigError

ENV_POSTGRES_URL = "DURABILITY_POSTGRES_URL"
ENV_REDIS_URL = "DURABILITY_REDIS_URL"
ENV_DAGSTER_POSTGRES_URL = "DAGSTER_POSTGRES_URL"
ENV_HOME = "DURABILITY_HOME"
ENV_PG_OS_USER = "DURABILITY_PG_OS_USER"

DAGSTER_DATABASE = "dagster"
# dagster-postgres goes through SQLAlchemy; with SQLAlchemy 2.1 a bare postgresql:// picks psycopg 3,
# whose server-side binding breaks dagster's `NOTIFY run_events, $1` and leaves runs NOT_STARTED
# (docs/configuration.md, "Storage and the psycopg2 scheme").
DAGSTER_URL_SCHEME = "postgresql+psycopg2"

_MASK = "***"
# Shorter strings are not scrubbed from driver text: replacing every "ab" would garble the message.
_MIN_SECRET_LEN = 3
_LOCK_TIMEOUT_S = 120.0
_START_TIMEOUT_S = 60.0


class ServiceUnavailableError(Exception):
    """A server the project needs cannot be reached or started; the message says what to do."""


class PostgresUnavailableError(ServiceUnavailableError):
    """The configured PostgreSQL does not accept connections."""


class RedisUnavailableError(ServiceUnavailableError):
    """The configured Redis does not answer PING."""


class EmbeddedServerError(ServiceUnavailableError):
    """An embedded server could not be started (missing package, permissions, port, log tail)."""


class ServiceRefusedError(Exception):
    """The server answered but refused this connection: retrying will not help, the configuration must change.

    Deliberately not a :class:`ServiceUnavailableError`: callers that wait for or fall back around an
    outage must not treat a wrong password as one.
    """


class ServiceAuthenticationError(ServiceRefusedError):
    """The server refused the credentials (wrong password, no such user or role, no password given)."""


class PostgresAuthenticationError(ServiceAuthenticationError):
    """PostgreSQL refused the user or password of the URL."""


class RedisAuthenticationError(ServiceAuthenticationError):
    """Redis answered ``WRONGPASS``, ``NOAUTH`` or refused ``AUTH``."""


class PostgresDatabaseMissingError(ServiceRefusedError):
    """PostgreSQL accepted the credentials but has no database of the URL's name."""


class InvalidServiceURLError(ConfigError):
    """A configured URL cannot be what the user meant (e.g. an unencoded ``@`` in the password).

    Raised *before* connecting: a driver would read a fragment of the password as the host and echo
    it. Holds only the masked URL, so neither ``str`` nor ``repr`` can leak a secret.
    """

    def __init__(self, message: str, *, source: str | None = None, masked_url: str = "") -> None:
        super().__init__(message)
        self.source = source
        self.masked_url = masked_url
