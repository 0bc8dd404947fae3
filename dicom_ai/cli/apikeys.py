"""API keys of the HTTP API: ``apikeys create``, ``list``, ``revoke``."""

from __future__ import annotations

import json
from enum import StrEnum
from typing import Annotated

import typer
from rich.table import Table

from dicom_ai.cli._common import (
    ConfigOption,
    _emit,
    _fail,
    command_context,
    console,
)


class KeyRole(StrEnum):
    """The role of an API key."""

    read = "read"
    operator = "operator"


def apikeys_create(
    name: Annotated[str, typer.Argument(help="Who or what uses the key.")],
    role: Annotated[KeyRole, typer.Option(help="read: data endpoints; operator: also re-run, "
                                          "re-send, retry, cancel.")] = KeyRole.read,
    config: ConfigOption = None,
) -> None:
    """Create an API key and print its token (shown this once; only its hash is stored)."""
    from datetime import UTC, datetime

    from storage import apikeys

    # ValueError: a name that is empty or too long
    with command_context(config, fails=(ValueError,)) as ctx, \
            ctx.db.write_session() as session:
        made = apikeys.create_key(session, name=name, role=role.value, now=datetime.now(UTC))
    console.print(f"key {made.info.id} ({made.info.role}) created; the token below is shown "
                  "only now: Authorization: Bearer <token>")
    typer.echo(made.token)


def apikeys_list(
    config: ConfigOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON list.")] = False,
) -> None:
    """API keys: id, name, role, prefix, created/revoked/last used (never a hash)."""
    from dicom_ai.views import apikey_view, dump
    from storage import apikeys

    with command_context(config) as ctx, ctx.db.sessions() as session:
        rows = apikeys.list_keys(session)
    data = dump([apikey_view(k) for k in rows])
    if as_json:
        typer.echo(json.dumps(data, indent=2))
        return
    table = Table("id", "name", "role", "prefix", "created", "revoked", "last used")
    for k in data:
        table.add_row(*(str(k[key] or "") for key in (
            "id", "name", "role", "prefix", "created_at", "revoked_at", "last_used_at")))
    _emit(table)


def apikeys_revoke(
    key_id: Annotated[int, typer.Argument(help="The key id (see `apikeys list`).")],
    config: ConfigOption = None,
) -> None:
    """Revoke an API key: requests with it get 401 from now on."""
    from datetime import UTC, datetime

    from storage import apikeys

    with command_context(config) as ctx, ctx.db.write_session() as session:
        done = apikeys.revoke_key(session, key_id, now=datetime.now(UTC))
    if not done:
        raise _fail(ValueError(f"no live API key {key_id}"))
    typer.echo(f"revoked key {key_id}")

