"""How this code location's runs share Dagster's run queue (tags read by dagster_home/dagster.yaml).

Consumers go first: a consumer that waits falls behind its stream and, after the stream's retention,
loses data; a late mirror or audit loses nothing. So consumer runs carry a higher ``dagster/priority``
(the QueuedRunCoordinator dequeues highest first), and maintenance runs (mirror, audit, retention)
carry ``durability/role: maintenance``, which dagster.yaml limits to one run at a time; their
schedules also skip a tick while one is still queued or running.
"""

from __future__ import annotations

from dagster import DagsterRunStatus

PRIORITY_TAG = "dagster/priority"
ROLE_TAG = "durability/role"
CONSUMER_RUN_PRIORITY = "10"
MAINTENANCE_RUN_PRIORITY = "-10"
MAINTENANCE_ROLE = "maintenance"

CONSUMER_RUN_TAGS = {PRIORITY_TAG: CONSUMER_RUN_PRIORITY}
MAINTENANCE_RUN_TAGS = {PRIORITY_TAG: MAINTENANCE_RUN_PRIORITY, ROLE_TAG: MAINTENANCE_ROLE}

#: A run in one of these has not finished: it holds (or waits for) its shard or its turn.
IN_FLIGHT_STATUSES = frozenset({
    DagsterRunStatus.QUEUED, DagsterRunStatus.NOT_STARTED, DagsterRunStatus.STARTING,
    DagsterRunStatus.STARTED, DagsterRunStatus.CANCELING, DagsterRunStatus.MANAGED,
})
