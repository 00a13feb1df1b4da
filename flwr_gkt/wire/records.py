"""Config and metric records: settings dataclasses, scalars, byte counts.

A settings dataclass travels as a ConfigRecord (:func:`settings_record`, read
back with :func:`settings_from_config`); a reply's metrics carry its
``num-examples`` weight first (:func:`metrics_record`); :func:`scalar` reads one
number from either kind of record and :func:`record_nbytes` counts a message's
array bytes.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from flwr.app import ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from flwr_gkt.core.payload import PayloadError
from flwr_gkt.wire.keys import NUM_EXAMPLES

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")

__all__ = [
    "metrics_record",
    "record_nbytes",
    "scalar",
    "settings_from_config",
    "settings_record",
]


def settings_from_config(cls: type[T], config: Mapping[str, Any]) -> T:
    """Build a settings dataclass from a ConfigRecord.

    Field ``batch_size`` is read from key ``batch-size``, and so on. Missing
    keys keep the field's default; present values are cast to the field's
    default's type (``int``, ``float``, ``bool``, ``str`` or an ``Enum``), so
    a ConfigRecord from any sender gives well-typed settings. Every field of
    ``cls`` must have a default; keys of ``config`` that are not fields are
    ignored.
    """
    base = cls()
    values = {}
    for f in dataclasses.fields(cls):
        key = f.name.replace("_", "-")
        if key in config:
            default = getattr(base, f.name)
            caster = type(default)
            values[f.name] = (
                caster(config[key])
                if not isinstance(default, enum.Enum)
                else caster(str(config[key]))
            )
    return dataclasses.replace(base, **values)


def settings_record(settings: DataclassInstance, **extra: Any) -> ConfigRecord:
    """Build the ConfigRecord of a settings dataclass (the inverse of :func:`settings_from_config`).

    Each field ``a_b`` becomes the key ``a-b``, an ``Enum`` is sent as its
    value; ``extra`` entries are added as given (they override the settings).
    """
    values: dict[str, Any] = {
        f.name.replace("_", "-"): _plain(getattr(settings, f.name))
        for f in dataclasses.fields(settings)
    }
    return ConfigRecord({**values, **extra})


def _plain(value: Any) -> Any:
    return value.value if isinstance(value, enum.Enum) else value


def record_nbytes(content: RecordDict | Mapping[str, ArrayRecord]) -> int:
    """Count the serialized bytes of every array in a message's content (or its ArrayRecords)."""
    records = content.array_records if isinstance(content, RecordDict) else content
    return sum(len(array.data) for record in records.values() for array in record.values())


def scalar(record: Mapping[str, Any], key: str, default: float | None = None) -> float:
    """Read one numeric value (integers and booleans converted) from a MetricRecord or ConfigRecord.

    ``default`` is returned when ``key`` is absent; ``None`` makes a missing
    key an error.

    Raises
    ------
    PayloadError
        If the key is missing (and there is no default) or the value is not a number.
    """
    if key not in record:
        if default is None:
            raise PayloadError(f"'{key}' missing")
        return default
    value = record[key]
    if not isinstance(value, int | float):
        raise PayloadError(f"'{key}' is not a number: {type(value).__name__}")
    return float(value)


def metrics_record(num_examples: int, **metrics: float) -> MetricRecord:
    """Build a reply's MetricRecord: the ``num-examples`` weight (an int), then ``metrics`` (floats)."""
    return MetricRecord(
        {NUM_EXAMPLES: int(num_examples), **{k: float(v) for k, v in metrics.items()}}
    )
