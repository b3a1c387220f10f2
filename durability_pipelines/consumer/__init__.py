"""The consumer core: config, events, handlers, batch processing, dispatch.

Plain Python (no Dagster import) so every rule — what to read, what to ack,
when to dead-letter, when to dispatch — is unit-testable on its own; the
Dagster layer in ``durability_pipelines.orchestration`` only wires these together.
"""
