"""Dagster component types this project ships (the dg registry module, see pyproject.toml)."""

from durability_pipelines.components.stream_consumer import StreamConsumer

__all__ = ["StreamConsumer"]
