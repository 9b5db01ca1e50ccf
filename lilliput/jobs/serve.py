"""`lilliput serve`: load the model (or a routed pair) and serve the OpenAI-compatible API (lilliput.serve)."""

from __future__ import annotations

from dataclasses import dataclass, field

from lilliput.core.checkpoint import LoadConfig
from lilliput.core.options import nested
from lilliput.serve.app import ServeConfig


@dataclass(frozen=True)
class ServeJob:
    load: LoadConfig = field(default=LoadConfig(), metadata=nested())
    """The model (unused with --small and --large)."""
    config: ServeConfig = field(default=ServeConfig(), metadata=nested())
    """Address, key, engine, routing."""


def run_serve(job: ServeJob) -> None:
    from lilliput.serve.app import run_server

    run_server(job.config, job.load)
