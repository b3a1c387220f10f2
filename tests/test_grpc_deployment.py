"""Dagster's deployment shape (the Helm chart's): the code location in a gRPC code server, the daemon
pointed at it by host/port through ``deploy/workspace.grpc.yaml``.

One module-scoped environment (``e2e``, ``tests.support.e2e`` with ``grpc=True``): a moto server, a
temporary ``DAGSTER_HOME`` with the repository's ``dagster.yaml`` on a fresh storage database,
``dagster code-server start -m durability_pipelines.definitions`` on a free loopback port, and
``dagster-daemon run -w deploy/workspace.grpc.yaml`` with ``DURABILITY_CODE_SERVER_HOST/PORT`` set.
A webserver on the same workspace is asked over GraphQL what it loads. Two consumers: ``main``
(happy path, where the runs really ran, what the webserver shows) and ``failover`` (its handler can
hold a batch, ``tests.support.dagster_daemon:deliveries_with_hold``, so that the daemon dies while a
run is in flight).

In this shape the default run launcher asks the code server to start each run, so run workers are
children of the code server, not of the daemon: a daemon that dies takes no run with it, and a
second daemon on the same storage and the same code server carries on.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

from durability_pipelines import services
from tests.support.dagster_daemon import (
    GRPC_WORKSPACE,
    LOCATION_NAME,
    DagsterWebserver,
    process_cmdline,
    sensor_state,
)
from tests.support.dynamodb import create_stream_table
from tests.support.e2e import (
    E2E,
    Consumer,
    assert_checkpoint_chain,
    assert_every_event_once,
    assert_runs_real_and_serial,
    e2e_environment,
)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def e2e(tmp_path_factory: pytest.TempPathFactory, postgres_url: str, postgres_admin_url: str,
        redis_url: str) -> Iterator[E2E]:
    # A logical Redis db that no session flushes (as tests/test_dagster_e2e.py does); keys are unique
    # to this environment and deleted at teardown.
    e2e_redis_url = services.with_redis_db(redis_url, (int(os.environ.get("DURABILITY_TEST_REDIS_DB", "13")) + 1) % 16)

    def consumers(ddb: Any, suffix: str) -> dict[str, Consumer]:
        return {
            "main": Consumer(f"grpc_main_{suffix}", create_stream_table(ddb)[0],
                             "tests.support.dagster_daemon:record_deliveries"),
            "failover": Consumer(f"grpc_failover_{suffix}", create_stream_table(ddb)[0],
                                 "tests.support.dagster_daemon:deliveries_with_hold",
                                 handler_options={"hold_flag": f"e2e:{suffix}:hold"}),
        }

    with e2e_environment(
        tmp_path_factory.mktemp("grpc_deployment"), postgres_url=postgres_url, admin_url=postgres_admin_url,
        redis_url=e2e_redis_url, consumers=consumers, grpc=True,
        extra_env={"DURABILITY_MIRROR_CRON": "0 0 1 1 *"},  # no mirror runs: only the consumers' runs
    ) as env:
        yield env


def grpc_origin(run: Any) -> Any:
    return run.dagster_run.remote_job_origin.repository_origin.code_location_origin


def test_sensor_launched_runs_through_the_code_server_deliver_every_event_once(e2e: E2E) -> None:
    c = e2e.consumers["main"]
    with e2e.dump_on_failure():
        e2e.produce_new(c, 200)
        last = e2e.wait_drained(c)
        (shard,) = last

        records = assert_every_event_once(e2e, c)
        assert e2e.redis_checkpoint(c, shard) == records[-1][1]
        runs = e2e.runs(c)
        assert runs and all(r.dagster_run.status.value == "SUCCESS" for r in runs)
        assert_runs_real_and_serial(e2e, c, runs)
        assert_checkpoint_chain(e2e, c, shard, runs)


def test_runs_and_ticks_went_through_the_grpc_code_server_not_the_daemon(e2e: E2E) -> None:
    from dagster._core.remote_origin import GrpcServerCodeLocationOrigin

    c = e2e.consumers["main"]
    with e2e.dump_on_failure():
        if not c.produced:
            e2e.produce_new(c, 50)
        e2e.wait_drained(c)
        server, daemon = e2e.code_server, e2e.daemon
        assert daemon.workspace == GRPC_WORKSPACE

        # Every run was created from the code server's location: its origin is a gRPC server at the
        # code server's address (an in-process workspace records a ManagedGrpcPythonEnvCodeLocationOrigin).
        runs = e2e.runs(c)
        assert runs
        for r in runs:
            origin = grpc_origin(r)
            assert isinstance(origin, GrpcServerCodeLocationOrigin), origin
            assert (origin.host, origin.port, origin.location_name) == (server.host, server.port, LOCATION_NAME)
        # The sensor is evaluated there too.
        state = sensor_state(e2e.instance, c.sensor)
        assert state is not None
        sensor_origin = state.origin.repository_origin.code_location_origin
        assert isinstance(sensor_origin, GrpcServerCodeLocationOrigin) and sensor_origin.port == server.port

        # The daemon spawned no code server of its own (with workspace.yaml its group holds a
        # `dagster api grpc` child that loads the code); the code server's group does.
        daemon_cmds = [" ".join(process_cmdline(pid)) for pid in daemon.group_members()]
        assert daemon_cmds and not [cmd for cmd in daemon_cmds if " api grpc" in cmd], daemon_cmds
        server_cmds = [" ".join(process_cmdline(pid)) for pid in server.group_members()]
        assert [cmd for cmd in server_cmds if " api grpc" in cmd], server_cmds


def test_daemon_failover_to_a_second_daemon_on_the_same_storage_resumes(e2e: E2E) -> None:
    c = e2e.consumers["failover"]
    flag = c.handler_options["hold_flag"]
    with e2e.dump_on_failure():
        e2e.produce_new(c, 100)
        before = e2e.wait_drained(c)
        (shard,) = before
        first_daemon = e2e.daemon

        # A run is in flight, held at the entry of the batch holding `hold`: the batches before are acked.
        e2e.redis.set(flag, "before:hold")
        e2e.produce(c, [f"{c.name}-pre-{i:03d}" for i in range(30)] + ["hold"]
                    + [f"{c.name}-post-{i:03d}" for i in range(30)])
        held = e2e.wait(lambda: e2e.redis.get(f"{flag}:held"), "a run to hold its batch")
        worker_pid = int(held.decode().split(":")[0])
        (in_flight,) = [r for r in e2e.runs(c) if r.dagster_run.status.value == "STARTED"]

        # The daemon dies. Its run worker is a child of the code server, not of the daemon: it lives on.
        first_daemon.kill()
        assert not first_daemon.alive() and not first_daemon.group_members()
        assert e2e.code_server.alive()
        assert worker_pid in e2e.code_server.group_members()
        assert os.getpgid(worker_pid) == e2e.code_server.pgid

        # With no daemon at all, the released run finishes its drain and succeeds.
        e2e.redis.delete(flag)
        e2e.wait(lambda: e2e.instance.get_run_by_id(in_flight.dagster_run.run_id).status.value == "SUCCESS",
                 "the in-flight run to succeed without a daemon")
        acked = e2e.redis_checkpoint(c, shard)
        assert acked is not None and int(acked) > int(before[shard])

        # A second daemon against the same storage and the same code server carries on.
        second = e2e.replace_daemon()
        assert second is not first_daemon and second.home is first_daemon.home
        e2e.produce_new(c, 100)
        last = e2e.wait_drained(c)
        assert e2e.redis_checkpoint(c, shard) == last[shard]

        runs = e2e.runs(c)
        assert all(r.dagster_run.status.value == "SUCCESS" for r in runs)
        later = [r for r in runs if r.create_timestamp > in_flight.create_timestamp]
        assert later and later[0].dagster_run.tags["durability/start_after"] == acked  # resumed at the ack
        assert_every_event_once(e2e, c)
        assert_runs_real_and_serial(e2e, c, runs)
        assert_checkpoint_chain(e2e, c, shard, runs)


LOCATION_QUERY = """
{
  workspaceOrError {
    __typename
    ... on Workspace {
      locationEntries {
        name
        displayMetadata { key value }
        locationOrLoadError {
          __typename
          ... on RepositoryLocation { repositories { name sensors { name } } }
          ... on PythonError { message }
        }
      }
    }
    ... on PythonError { message }
  }
}
"""

RUN_QUERY = """
query Run($runId: ID!) {
  runOrError(runId: $runId) { __typename ... on Run { runId status jobName } ... on PythonError { message } }
}
"""


def test_webserver_on_the_grpc_workspace_serves_the_code_servers_location_and_its_runs(e2e: E2E) -> None:
    c = e2e.consumers["main"]
    with e2e.dump_on_failure():
        if not c.produced:
            e2e.produce_new(c, 50)
        e2e.wait_drained(c)
        web = DagsterWebserver(e2e.daemon.home, e2e.node_env(), e2e.tmp / "webserver.log", workspace=GRPC_WORKSPACE)
        try:
            web.start()
            data = web.graphql(LOCATION_QUERY)["workspaceOrError"]
            assert data["__typename"] == "Workspace", data
            (entry,) = data["locationEntries"]
            assert entry["name"] == LOCATION_NAME
            meta = {m["key"]: m["value"] for m in entry["displayMetadata"]}
            assert (meta.get("host"), meta.get("port")) == (e2e.code_server.host, str(e2e.code_server.port)), meta
            location = entry["locationOrLoadError"]
            assert location["__typename"] == "RepositoryLocation", location
            sensors = {s["name"] for repo in location["repositories"] for s in repo["sensors"]}
            assert {x.sensor for x in e2e.consumers.values()} <= sensors

            run = e2e.runs(c)[-1].dagster_run
            shown = web.graphql(RUN_QUERY, {"runId": run.run_id})["runOrError"]
            assert (shown["__typename"], shown["status"], shown["jobName"]) == ("Run", "SUCCESS", run.job_name)
        finally:
            web.stop()
