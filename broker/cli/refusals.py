"""How the CLI refuses: one line on stderr starting with "broker: ", exit status 1 (usage
errors, exit 2, are click's own and are printed by `broker.cli.root.run`)."""

from __future__ import annotations

from typing import Any

import click

from broker.cli.clients import ClientError

__all__ = [
    "CommandNotExecutable",
    "CommandNotFound",
    "Refusal",
    "client_error_message",
    "one_line",
]


class Refusal(click.ClickException):
    """A runtime refusal: printed as one line "broker: <message>", exit status 1."""

    exit_code = 1

    def show(self, file: Any = None) -> None:
        click.echo(f"broker: {self.format_message()}", err=True)


class CommandNotFound(Refusal):
    """`broker exec`: the command does not exist (the shell's 127)."""

    exit_code = 127


class CommandNotExecutable(Refusal):
    """`broker exec`: the command exists but cannot be run (the shell's 126)."""

    exit_code = 126


def one_line(text: str) -> str:
    return " ".join(text.split())


_CODE_TEXT = {
    "INVALID_ARGUMENT": "invalid argument",
    "PERMISSION_DENIED": "permission denied",
    "UNAUTHENTICATED": "not authenticated",
    "NOT_FOUND": "not found",
    "ALREADY_EXISTS": "already exists",
    "FAILED_PRECONDITION": "failed precondition",
    "RESOURCE_EXHAUSTED": "resource exhausted",
    "DEADLINE_EXCEEDED": "timed out",
    "UNIMPLEMENTED": "not supported by this broker",
    "INTERNAL": "internal error",
    "CANCELLED": "cancelled",
}


def client_error_message(error: ClientError, server: str) -> str:
    """The one line (without "broker: ") for a failed call."""
    if error.code_name == "UNAVAILABLE" and error.message.startswith("key backend error: "):
        # The broker answered: its token (HSM) failed, e.g. a mechanism it does not offer.
        return one_line(error.message)
    if error.code_name == "UNAVAILABLE" and error.answered:
        # The broker is up; what is behind it (a database, its storage) is not.
        return one_line(f"unavailable (the broker at {server} answered): {error.message}")
    if error.code_name == "UNAVAILABLE":
        return one_line(f"cannot reach the broker at {server}: {error.message}")
    text = _CODE_TEXT.get(error.code_name, error.code_name.lower().replace("_", " "))
    return one_line(f"{text}: {error.message}")
