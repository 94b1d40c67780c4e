"""Client records from response messages: one function instead of a hand-written mapping per
record. A record is a frozen dataclass whose fields are named as the message's (or renamed);
a Timestamp field becomes an aware datetime (None when unset and the field may be None),
a repeated field a list (a tuple where the record says so), a map field a dict, anything
else is taken as it is."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from typing import Any, TypeVar

from google.protobuf.message import Message

from broker.api.timestamps import optional_datetime, to_datetime

__all__ = ["record_from"]

_Record = TypeVar("_Record")
_TIMESTAMP = "google.protobuf.Timestamp"


def _value(message: Message, field: Any, hint: Any) -> Any:
    value = getattr(message, field.name)
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        return dict(value)
    if field.is_repeated:
        return tuple(value) if typing.get_origin(hint) is tuple else list(value)
    if field.message_type is not None and field.message_type.full_name == _TIMESTAMP:
        optional = type(None) in typing.get_args(hint)
        return optional_datetime(message, field.name) if optional else to_datetime(value)
    return value


def record_from(
    cls: type[_Record], message: Message, rename: Mapping[str, str] | None = None
) -> _Record:
    """`cls` (a dataclass) filled from `message`: each field from the message field of the
    same name, or of `rename[name]`. A field the message lacks is an error (KeyError), not a
    silent default."""
    hints = typing.get_type_hints(cls)
    by_name = message.DESCRIPTOR.fields_by_name
    values = {
        f.name: _value(message, by_name[(rename or {}).get(f.name, f.name)], hints[f.name])
        for f in dataclasses.fields(cls)  # type: ignore[arg-type]
    }
    return cls(**values)
