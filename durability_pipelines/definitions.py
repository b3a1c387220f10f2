"""The code location: one ``Definitions`` object, built from a dg defs folder.

Each consumer is an instance of the ``StreamConsumer`` component, a folder with a ``defs.yaml``: the
shipped ones in ``durability_pipelines/defs/consumers/``, or those under ``$DURABILITY_CONSUMERS_DIR``
(a folder of the same layout, which then replaces them). Adding a consumer is adding a folder.
Around them: each consumed stream once (an external asset), the mirror and audit assets with their
checks, run retention, the alert sensors (``orchestration/alerts.py``), and the ``durability`` resource.
"""

from __future__ import annotations

import hashlib
import os
import sys
import types
from pathlib import Path

from dagster import ComponentTree, Definitions

import durability_pipelines.defs
from durability_pipelines.components import StreamConsumer
from durability_pipelines.consumer.config import (
    CONSUMERS_DIR,
    configured_consumers_dir,
    load_consumer_instances,
    scan_consumer_instances,
)
from durability_pipelines.orchestration.alerts import build_alert_defs
from durability_pipelines.orchestration.assets import build_audit_defs
from durability_pipelines.orchestration.broken import build_broken_defs
from durability_pipelines.orchestration.consumers import (
    build_consumer_defs,
    stream_asset_spec,
    validate_for_dagster,
)
from durability_pipelines.orchestration.resources import durability_resource_from_env
from durability_pipelines.orchestration.retention import build_retention_defs

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SHIPPED_DEFS = Path(durability_pipelines.defs.__file__).resolve().parent


def component_tree(consumers_dir: Path | None = None) -> ComponentTree:
    """The shipped defs folder's tree, or one over ``consumers_dir`` (any folder of component instances:
    it is given a module of its own, as dg gives the project's defs folder).

    ``dagster.ComponentTree.from_module`` (public, what ``dg.components.load_defs`` does) rather than
    ``dagster.load_from_defs_folder``: that one finds the project through a ``pyproject.toml`` / ``dg.toml``
    above the package, which an installed wheel does not have, and it cannot load a folder outside the
    project (``$DURABILITY_CONSUMERS_DIR``). ``load_defs`` itself is deprecated since Dagster 1.11."""
    if consumers_dir is None or consumers_dir.resolve() in (SHIPPED_DEFS, CONSUMERS_DIR.resolve()):
        return ComponentTree.from_module(defs_module=durability_pipelines.defs, project_root=PROJECT_ROOT)
    directory = consumers_dir.resolve()
    name = "durability_consumers_" + hashlib.sha1(str(directory).encode()).hexdigest()[:12]
    module = sys.modules.get(name)
    if module is None:
        module = types.ModuleType(name, f"consumer instances under {directory}")
        module.__file__ = str(directory / "__init__.py")
        module.__path__ = [str(directory)]
        sys.modules[name] = module
    return ComponentTree.from_module(defs_module=module, project_root=directory.parent)


#: Set by ``dg check defs`` (and ``dagster definitions validate``): definitions are being validated, not run.
VALIDATION_ENV = "DAGSTER_IS_DEFS_VALIDATION_CLI"


def build_definitions(consumers_dir: Path | None = None, *, strict: bool | None = None) -> Definitions:
    """The code location. One bad consumer file does not take the others down: outside validation it is left
    out and reported by a sensor of its own that fails every tick naming the file and the field, while every
    good consumer, the mirror and retention keep running. ``strict`` (default: under ``dg check defs``) fails
    the load instead, listing every problem of every file."""
    directory = consumers_dir or configured_consumers_dir()
    strict = os.environ.get(VALIDATION_ENV) == "1" if strict is None else strict
    if strict or not directory.is_dir():
        # Every problem of every consumer file at once, each naming its file and field (the component tree
        # would stop at the first).
        load_consumer_instances(directory, check=validate_for_dagster)
        loaded, broken = None, []
    else:
        loaded, broken = scan_consumer_instances(directory, check=validate_for_dagster)
    if not broken:
        tree = component_tree(directory)
        consumers = [c.config for c in tree.get_all_components(of_type=StreamConsumer)]
        instance_defs = tree.build_defs()  # the instances' defs, the tree itself and the component types (UI docs)
    else:
        # The component tree would fail on the bad file: build the good instances one by one (the UI then lacks
        # the component tree's pages until the file is fixed).
        consumers = [cfg for _, cfg in loaded or []]
        instance_defs = Definitions.merge(*(build_consumer_defs(cfg) for cfg in consumers), build_broken_defs(broken))
    streams = {stream_asset_spec(cfg).key: stream_asset_spec(cfg) for cfg in consumers}
    return Definitions.merge(
        instance_defs,
        build_audit_defs(consumers),
        build_retention_defs(),
        build_alert_defs(consumers),  # failed runs and missed lag objectives, posted to a webhook
        Definitions(assets=list(streams.values()), resources={"durability": durability_resource_from_env()}),
    )


defs = build_definitions()
