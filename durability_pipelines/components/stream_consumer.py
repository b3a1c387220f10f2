"""``StreamConsumer``: a stream consumer declared the Dagster way, as a component instance.

One ``defs.yaml`` per consumer (``durability_pipelines/defs/consumers/<name>/defs.yaml``)::

    type: durability_pipelines.components.StreamConsumer
    attributes:
      name: orders_worker
      source: {kind: dynamodb, table: orders}
      group: workers
      consumer: consumer-a

Its attributes are the consumer config (``consumer/config.py``: one schema, which ``dg check defs``,
``dg scaffold defs`` and the UI (Deployment > the code location > Components) show); the component builds the consumer's sensor, its job
(whose runs drain a shard batch by batch), its sink asset (downstream of the stream's asset, with a
materialization per run carrying lag and throughput) and the sink's lag check.
"""

from __future__ import annotations

from pathlib import Path

from dagster import (
    Component,
    ComponentLoadContext,
    Definitions,
    ResolutionContext,
    Resolvable,
    Scaffolder,
    ScaffoldRequest,
    scaffold_with,
)
from pydantic import BaseModel

from durability_pipelines.checkpoints.errors import ConfigError
from durability_pipelines.consumer.config import ConsumerConfig

STARTER = Path(__file__).resolve().parent.parent / "defs" / "consumers" / "orders_worker" / "defs.yaml"
TYPE_NAME = "durability_pipelines.components.StreamConsumer"


class StreamConsumerScaffolder(Scaffolder):
    """``dg scaffold defs durability_pipelines.components.StreamConsumer consumers/<name>``: a working consumer
    (a copy of the DynamoDB starter, named after its folder) to edit."""

    def scaffold(self, request: ScaffoldRequest) -> None:
        target = Path(request.target_path)
        name = target.name.replace("-", "_")
        text = STARTER.read_text(encoding="utf-8")
        body = text[text.index(f"type: {TYPE_NAME}"):]
        body = body.replace("name: orders_worker", f"name: {name}").replace("consumer: consumer-a", f"consumer: {name}")
        body = body.replace('description: "DynamoDB stream of the `orders` table', f'description: "{name}: DynamoDB stream of the `orders` table')
        text = (f"# Consumer {name}, scaffolded from the orders_worker starter: set source.table (the stream), group\n"
                "# and consumer (with the stream, they are the checkpoint key), and the handler.\n"
                "# Every attribute is documented in docs/configuration.md and in the UI (Deployment > the code location > Components).\n"
                + body)
        target.mkdir(parents=True, exist_ok=True)
        (target / "defs.yaml").write_text(text, encoding="utf-8")


@scaffold_with(StreamConsumerScaffolder)
class StreamConsumer(Component, Resolvable):
    """A change-stream consumer with durable, fenced checkpoints: a sensor polling the stream from the acked
    checkpoints, a job whose runs drain a shard batch by batch (read -> process -> ack), the sink it writes
    as an asset, and a lag check on it. Attributes: see docs/configuration.md.

    A ``Resolvable`` component whose model is ``ConsumerConfig`` itself (``Component.get_model_cls`` and
    ``Component.load`` are Dagster's own). Not a model derived from the fields (``Resolvable, Model``):
    a derived model admits a string for every field (a template to render), so ``dg check defs`` would
    pass ``max_events: soon``, and it needs every nested model (the checkpoint store's ``StoreConfig``
    among them) to be ``Resolvable``. The attributes are plain values, no templates."""

    def __init__(self, config: ConsumerConfig | None = None) -> None:
        if config is None:  # a defs.yaml without attributes (Dagster then calls cls())
            raise ConfigError("a StreamConsumer needs its attributes: name, source, group and consumer at least")
        self.config = config

    @classmethod
    def model(cls) -> type[BaseModel]:
        return ConsumerConfig

    @classmethod
    def resolve_from_model(cls, context: ResolutionContext, model: BaseModel) -> StreamConsumer:
        config = model if isinstance(model, ConsumerConfig) else ConsumerConfig.model_validate(model.model_dump())
        return cls(config)

    def build_defs(self, context: ComponentLoadContext) -> Definitions:
        from durability_pipelines.orchestration.consumers import build_consumer_defs, validate_for_dagster

        validate_for_dagster(self.config, Path(context.path) / "defs.yaml")
        return build_consumer_defs(self.config)
