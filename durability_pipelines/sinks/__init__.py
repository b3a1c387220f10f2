"""Idempotent sinks and the handlers built on them (no Dagster import)."""
