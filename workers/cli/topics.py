"""`flockserve topics`: Kafka topics."""

from __future__ import annotations

import asyncio
from typing import Annotated, Optional

import typer

from workers.cli.app import CliError, JsonFlag, emit, group, run_cli

topics_app = group("topics", "Kafka topics.")


@topics_app.command("create")
def topics_create(partitions: Annotated[Optional[int], typer.Option(help="Request-topic partitions.")] = None,
                  as_json: JsonFlag = False) -> None:
    """Create Flock's topics if missing (idempotent) and show their partition counts."""
    from workers.config import settings
    from workers.kafka_admin import ensure_topics, topic_plan

    s = settings()

    def go():
        try:
            return asyncio.run(ensure_topics(s.kafka_bootstrap, topic_plan(partitions or s.request_partitions)))
        except Exception as exc:  # aiokafka's admin client raises a zoo of connection errors
            raise CliError(f"kafka at {s.kafka_bootstrap}: {type(exc).__name__}: {exc}") from None

    counts = run_cli(go)
    rows = [{"topic": t, "partitions": n} for t, n in sorted(counts.items())]
    emit(rows, as_json, ["topic", "partitions"], title="topics")
