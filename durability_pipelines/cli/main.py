"""Run one command and map what went wrong to an exit code and a masked message."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TextIO

from durability_pipelines import services
from durability_pipelines.checkpoints.errors import (
    ConfigError,
    DurabilityError,
    InvalidCheckpointKeyError,
    InvalidSequenceError,
    LeaseLostError,
    StoreUnavailableError,
)
from durability_pipelines.cli.exit_codes import (
    EXIT_ACCESS_DENIED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_REFUSED,
    EXIT_UNAVAILABLE,
    EXIT_USAGE,
    CliError,
)
from durability_pipelines.cli.parser import build_parser
from durability_pipelines.cli.schema import cmd_demo
from durability_pipelines.cli.secrets import scrub
from durability_pipelines.cli.session import BACKENDS, ENV_BACKEND, Session


def main(argv: Sequence[str] | None = None, *, stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    """Run one command; returns the exit code (never raises for operator errors)."""
    out, err = stdout or sys.stdout, stderr or sys.stderr
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a usage error argparse already printed
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    if args.command == "demo":
        try:
            return cmd_demo(args)
        except services.InvalidServiceURLError as exc:  # masked messages: a traceback would add nothing
            print(f"error: {scrub(str(exc), [args.postgres_url, args.redis_url])}", file=err)
            return EXIT_USAGE
        except (services.ServiceRefusedError, services.ServiceUnavailableError) as exc:
            print(f"error: {scrub(str(exc), [args.postgres_url, args.redis_url])}", file=err)
            return EXIT_ACCESS_DENIED if isinstance(exc, services.ServiceRefusedError) else EXIT_UNAVAILABLE
    if args.backend not in BACKENDS:  # a default from the environment bypasses argparse's choices
        print(f"error: ${ENV_BACKEND}={args.backend!r} is not a backend this CLI can operate on; "
              f"use one of {', '.join(BACKENDS)} (memory checkpoints live inside one process)", file=err)
        return EXIT_USAGE
    session = Session(args, out, err)
    code = EXIT_OK
    message: str | None = None
    try:
        code = args.func(session, args)
    except CliError as exc:
        code, message = exc.code, str(exc)
    except (services.InvalidServiceURLError, InvalidCheckpointKeyError, InvalidSequenceError,
            ConfigError) as exc:
        code, message = EXIT_USAGE, str(exc)
    except services.ServiceRefusedError as exc:
        code, message = EXIT_ACCESS_DENIED, str(exc)
    except (services.ServiceUnavailableError, StoreUnavailableError) as exc:
        code, message = EXIT_UNAVAILABLE, str(exc)
    except LeaseLostError as exc:
        code, message = EXIT_REFUSED, str(exc)
    except DurabilityError as exc:
        code, message = EXIT_REFUSED, f"{type(exc).__name__}: {exc}"
    except KeyboardInterrupt:
        code, message = EXIT_INTERRUPTED, "interrupted"
    except Exception as exc:  # driver errors: report without a traceback (and without secrets)
        code, message = _driver_error(exc)
    finally:
        try:
            session.close()
        except Exception as exc:  # noqa: BLE001 - closing must not hide the command's result
            if message is None and code == EXIT_OK:
                session.warn(f"closing connections failed: {type(exc).__name__}: {exc}")
    if message is not None:
        print(f"error: {scrub(message, session.urls())}", file=err)
    return code


def _driver_error(exc: Exception) -> tuple[int, str]:
    import psycopg
    import redis

    if isinstance(exc, psycopg.errors.UndefinedTable | psycopg.errors.UndefinedFunction):
        return EXIT_UNAVAILABLE, (f"the database has no durability_pipelines schema ({exc.diag.message_primary}). "
                                  "Run `durability-pipelines migrate` first.")
    if services.is_credentials_error(exc):  # checked first: redis' AuthenticationError is a ConnectionError
        return EXIT_ACCESS_DENIED, (
            f"the server answered but refused the credentials: {type(exc).__name__}: {exc}. "
            "Check the user and password in the URL (special characters percent-encoded)")
    if isinstance(exc, psycopg.OperationalError | redis.ConnectionError | redis.TimeoutError):
        return EXIT_UNAVAILABLE, f"server unavailable: {type(exc).__name__}: {exc}"
    if isinstance(exc, psycopg.Error | redis.RedisError):
        return EXIT_UNAVAILABLE, f"{type(exc).__name__}: {exc}"
    raise exc
