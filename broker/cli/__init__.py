"""The `broker` command line.

`broker serve` runs the service (`broker.daemon`); every other command is a client of a running
broker, authenticated with mTLS by the operator SVID that `broker serve --dev` writes under its
data directory (or by --cert/--key/--bundle, or the `broker login` under $BROKER_HOME).

Contract kept for scripts: exit 0 on success, 1 when something was refused or failed (server
error, bad file, broker unreachable), 2 for usage errors; every refusal is ONE line on stderr,
starting with "broker: ". `--output json` documents are stable (see `broker.cli.render`).

Layout: `root` (the group and entry points) imports one module per feature group
(`authority`: svid/jwt/ca, `audit`, `identity`, `database`, `secrets`, `access`, `operators`,
`serve`: serve/agent); those import only the shared modules: `clients` (the `Clients` seam,
the only importer of the client SDK), `options`, `inputs`, `refusals` and `render`. Commands
get their clients from the click context (`CliContext.connect`), so tests hand in fakes.

To add a command group: a module `broker/cli/<feature>.py` defining `@click.group()` commands
with `connection_options(on_group=False)`, taking its client from `clients(ctx).<feature>`
(add the client to `Clients` and `GrpcClients` in clients.py if it is new) and printing with
`render(ctx, record_json(record), text)`; attach it in root.py with one line; test its JSON
and text against fakes in tests/unit/broker/cli/ (fakes.py).
"""

from __future__ import annotations

import os

# gRPC core writes its own log lines to stderr (TLS handshake failures at INFO, a busy port at
# ERROR) unless GRPC_VERBOSITY is set before grpc is first imported. The CLI promises one line
# per refusal and says what went wrong itself; set GRPC_VERBOSITY to see gRPC's logs again.
# Set here, in the package, because importing any `broker.cli` module runs this first.
os.environ.setdefault("GRPC_VERBOSITY", "NONE")

from broker.cli.clients import Clients, ConnectionSettings
from broker.cli.options import CliContext, broker_home, default_attest_server
from broker.cli.refusals import Refusal, client_error_message
from broker.cli.root import cli, main, run

__all__ = [
    "CliContext",
    "Clients",
    "ConnectionSettings",
    "Refusal",
    "broker_home",
    "cli",
    "client_error_message",
    "default_attest_server",
    "main",
    "run",
]
