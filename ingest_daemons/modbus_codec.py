"""Modbus register decoding (and encoding) and read planning, free of any I/O.

Decoding: a point's registers arrive as 16-bit words in request order. `word_order` says whether
the first register holds the most significant word ("big", the Modbus convention) or the least
("little"); `byte_order` says whether each register carries its high byte first ("big", the
Modbus convention) or swapped ("little"). With A the most significant byte of a float32, the
four combinations are the usual ABCD (big/big), BADC (byte little), CDAB (word little) and
DCBA (both little). The engineering value is `raw * scale + offset`.

Planning: points of the same table that sit at or near each other are read with one request
(at most 125 registers, or 2000 bits for coils and discrete inputs, per the Modbus spec), allowing
small gaps of unmapped addresses in between, so a register map of a few hundred points is polled
with a handful of round trips.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

from sensormine.devices.profiles import ModbusPoint

MAX_READ_REGISTERS = 125
"""Registers one Read Holding/Input Registers request may ask for (Modbus spec, FC 3 and 4)."""
MAX_READ_BITS = 2000
"""Bits one Read Coils/Discrete Inputs request may ask for (Modbus spec, FC 1 and 2)."""
MAX_GAP_REGISTERS = 8
"""Unmapped registers a batched request may read (and discard) to join two points."""
MAX_GAP_BITS = 64
"""Unmapped bits a batched request may read (and discard) to join two points."""

BIT_TABLES = frozenset({"coil", "discrete"})

# struct code of each register data type (read big-endian after the words are put in order).
_STRUCT_CODE = {"int16": "h", "uint16": "H", "int32": "i", "uint32": "I", "float32": "f", "float64": "d"}
_WORDS = {"int16": 1, "uint16": 1, "int32": 2, "uint32": 2, "float32": 2, "float64": 4, "bool": 1}


class CodecError(ValueError):
    """Registers that cannot be decoded as the point says (wrong count), or a value that cannot be encoded."""


def register_decoder(
    data_type: str, byte_order: str = "big", word_order: str = "big"
) -> Callable[[Sequence[int]], float]:
    """A function turning a point's registers (request order) into its raw value."""
    if data_type == "bool":
        return lambda words: 1.0 if words[0] else 0.0
    # One-register types are the bulk of most maps: plain arithmetic beats struct there.
    if data_type in ("uint16", "int16"):
        swap = byte_order == "little"
        if data_type == "uint16":
            if swap:
                return lambda words: float((words[0] & 0xFF) << 8 | words[0] >> 8)
            return lambda words: float(words[0])
        if swap:
            return lambda words: float(((words[0] & 0xFF) << 8 | words[0] >> 8) ^ 0x8000) - 32768.0
        return lambda words: float(words[0] ^ 0x8000) - 32768.0
    code = _STRUCT_CODE[data_type]
    n = _WORDS[data_type]
    pack = struct.Struct((">" if byte_order == "big" else "<") + "H" * n).pack
    unpack = struct.Struct(">" + code).unpack
    if word_order == "big" or n == 1:
        return lambda words: float(unpack(pack(*words))[0])
    return lambda words: float(unpack(pack(*reversed(words)))[0])


def decode_registers(data_type: str, words: Sequence[int], byte_order: str = "big", word_order: str = "big") -> float:
    """The raw value held by `words` (exactly as many registers as the type takes)."""
    if len(words) != _WORDS[data_type]:
        raise CodecError(f"{data_type} takes {_WORDS[data_type]} registers, got {len(words)}")
    return register_decoder(data_type, byte_order, word_order)(words)


def encode_registers(data_type: str, raw: float, byte_order: str = "big", word_order: str = "big") -> list[int]:
    """The registers holding raw value `raw` (the inverse of `decode_registers`); ints are rounded."""
    if data_type == "bool":
        return [1 if raw else 0]
    code = _STRUCT_CODE[data_type]
    n = _WORDS[data_type]
    value: float | int = raw if code in "fd" else round(raw)
    try:
        data = struct.pack(">" + code, value)
    except struct.error as exc:
        raise CodecError(f"{raw!r} does not fit {data_type}: {exc}") from None
    words = list(struct.unpack((">" if byte_order == "big" else "<") + "H" * n, data))
    return words if word_order == "big" else words[::-1]


def point_value(point: ModbusPoint, raw: float) -> float:
    """The engineering value of a raw value: raw * scale + offset."""
    return raw * point.scale + point.offset


def encode_point(point: ModbusPoint, value: float) -> list[int]:
    """Registers (or, for bit tables, a one-element [0|1]) that make the point read `value`."""
    raw = (value - point.offset) / point.scale if point.scale else 0.0
    if point.table in BIT_TABLES:
        return [1 if raw else 0]
    return encode_registers(point.data_type, raw, point.byte_order, point.word_order)


@dataclass(frozen=True)
class ReadRequest:
    """One Modbus read: `count` registers (or bits) of `table` from `address`, covering `points`."""

    table: str
    address: int
    count: int
    points: tuple[ModbusPoint, ...]
    metrics: tuple[str, ...] = field(init=False, repr=False, compare=False)
    """The points' metrics, in the order `decode` returns their values."""
    may_be_non_finite: bool = field(init=False, repr=False, compare=False)
    """True when a point is a float (whose registers may hold NaN or ±inf)."""
    _decoders: tuple[tuple[int, int, Callable[[Sequence[int]], float], float, float], ...] = field(
        init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "metrics", tuple(p.metric for p in self.points))
        floats = any(p.data_type in ("float32", "float64") for p in self.points)
        object.__setattr__(self, "may_be_non_finite", floats and not self.is_bits)
        decoders = tuple(
            (
                p.address - self.address,
                p.words,
                register_decoder(p.data_type, p.byte_order, p.word_order),
                p.scale,
                p.offset,
            )
            for p in self.points
        )
        object.__setattr__(self, "_decoders", decoders)

    @property
    def is_bits(self) -> bool:
        """True for coils and discrete inputs (read as bits, not registers)."""
        return self.table in BIT_TABLES

    def decode(self, data: Sequence[int] | Sequence[bool]) -> list[float]:
        """Engineering values of `points`, in order, from the response's registers (or bits)."""
        if len(data) < self.count:
            raise CodecError(f"response has {len(data)} of the {self.count} {self._unit} asked for")
        if self.is_bits:
            return [(1.0 if data[i] else 0.0) * scale + offset for i, _, _, scale, offset in self._decoders]
        words: Sequence[int] = data  # type: ignore[assignment]
        return [fn(words[i : i + n]) * scale + offset for i, n, fn, scale, offset in self._decoders]

    @property
    def _unit(self) -> str:
        return "bits" if self.is_bits else "registers"


def plan_reads(
    points: Iterable[ModbusPoint],
    max_registers: int = MAX_READ_REGISTERS,
    max_bits: int = MAX_READ_BITS,
    max_gap_registers: int = MAX_GAP_REGISTERS,
    max_gap_bits: int = MAX_GAP_BITS,
) -> list[ReadRequest]:
    """Batch points into as few reads as the limits allow: per table, by address, joining points whose
    gap is at most `max_gap_*` while the request stays within `max_*`. Overlapping points share registers.

    Requests come out ordered by table (holding, input, coil, discrete) then address.
    """
    order = {"holding": 0, "input": 1, "coil": 2, "discrete": 3}
    by_table: dict[str, list[ModbusPoint]] = {}
    for p in points:
        by_table.setdefault(p.table, []).append(p)
    plan: list[ReadRequest] = []
    for table in sorted(by_table, key=order.__getitem__):
        bits = table in BIT_TABLES
        limit, gap = (max_bits, max_gap_bits) if bits else (max_registers, max_gap_registers)
        group: list[ModbusPoint] = []
        start = end = 0  # the current request covers [start, end)
        for p in sorted(by_table[table], key=lambda q: (q.address, q.words)):
            p_end = p.address + p.words
            if group and p.address - end <= gap and max(end, p_end) - start <= limit:
                group.append(p)
                end = max(end, p_end)
                continue
            if group:
                plan.append(ReadRequest(table, start, end - start, tuple(group)))
            group, start, end = [p], p.address, p_end
        if group:
            plan.append(ReadRequest(table, start, end - start, tuple(group)))
    return plan


def split_request(request: ReadRequest) -> list[ReadRequest]:
    """One request per point: the fallback when a device refuses a batched read (illegal address)."""
    return [ReadRequest(request.table, p.address, p.words, (p,)) for p in request.points]
