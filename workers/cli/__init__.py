"""`flockserve` command line: one module per command group, all on the root ``app``.

To add a command group: write a module that creates it with ``workers.cli.app.group(name, help)``
(or adds commands to an existing group such as ``workers.cli.tenants.adapter_app``) and list the
module in COMMAND_MODULES below. Shared conventions (tables / ``--json``, one-line ``error:``)
live in :mod:`workers.cli.app`.
"""

from __future__ import annotations

import importlib

from workers.cli.app import app

# Imported for their side effect: each registers its commands on `app`. Order = order in --help.
COMMAND_MODULES = (
    "workers.cli.worker",
    "workers.cli.db",
    "workers.cli.tenants",
    "workers.trainer.cli",  # flockserve adapter train
    "workers.cli.security",
    "workers.cli.topics",
    "workers.cli.control",
    "workers.cli.traffic",
    "workers.trainer.cli_jobs",
    "workers.cli.base",  # flockserve base build-plot (issue 13)
)

for _m in COMMAND_MODULES:
    importlib.import_module(_m)


def main() -> None:
    app()


__all__ = ["app", "main"]
