"""``StreamConsumer``: a stream consumer declared the Dagster way, as a component instance.

One ``defs.yaml`` per consumer (``durability_pipelines/defs/consumers/<name>/defs.yaml``)::

    type: durability_pipelines.components.StreamConsumer
    attributes:
      name: orders_worker
      source: {kind: dynamodb, table: orders}
      group: workers
      consumer: consumer-a

Its attributes are the consumer config (``consumer/config.py``: one schema, which ``dg check defs``,
``dg scaffold defs`` and the UI's Docs tab show); the component builds the consumer's sensor, its job
(whose runs drain a shard batch by batch), its sink asset (downstream of the stream's asset, with a
materialization per run carrying lag and throughput) and the sink's lag check.
"""

from __future__ import annotations

from pathlib import Path

from dagster import Component, ComponentLoadContext, Definitions
from dagster.components.scaffold.scaffold import Scaffolder, ScaffoldRequest, scaffold_with
from pydantic import BaseModel

from durability_pipelines.consumer.config import ConsumerConfig, config_error

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
                "# Every attribute is documented in docs/configuration.md and in the UI (the code location's Docs).\n"
                + body)
        target.mkdir(parents=True, exist_ok=True)
        (target / "defs.yaml").write_text(text, encoding="utf-8")


@scaffold_with(StreamConsumerScaffolder)
class StreamConsumer(Component):
    """A change-stream consumer with durable, fenced checkpoints: a sensor polling the stream from the acked
    checkpoints, a job whose runs drain a shard batch by batch (read -> process -> ack), the sink it writes
    as an asset, and a lag check on it. Attributes: see docs/configuration.md."""

    def __init__(self, config: ConsumerConfig, path: Path | None = None) -> None:
        self.config = config
        self.path = path

    @classmethod
    def get_model_cls(cls) -> type[BaseModel]:
        return ConsumerConfig

    @classmethod
    def load(cls, attributes: BaseModel | None, context: ComponentLoadContext) -> StreamConsumer:
        path = Path(context.path) / "defs.yaml" if context.path else None
        if attributes is None:
            raise config_error(path, "the consumer has no attributes (name, source, group, consumer at least)")
        config = attributes if isinstance(attributes, ConsumerConfig) else ConsumerConfig.model_validate(
            attributes.model_dump())
        from durability_pipelines.orchestration.consumers import validate_for_dagster

        validate_for_dagster(config, path)
        return cls(config, path)

    def build_defs(self, context: ComponentLoadContext | None = None) -> Definitions:
        from durability_pipelines.orchestration.consumers import build_consumer_defs

        return build_consumer_defs(self.config)

