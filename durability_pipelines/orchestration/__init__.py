"""The Dagster layer: resources, consumer jobs and sensors, mirror and audit assets.

Thin wiring only; the rules live in ``checkpoints``, ``sources``, ``sinks``
and ``consumer``.
"""
