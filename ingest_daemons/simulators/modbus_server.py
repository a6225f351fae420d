"""A Modbus TCP device simulator (pymodbus server): a motor and a tank behind one register map.

The register map (`register_map()`, and the matching daemon profile `ModbusSimulator.profile()`)
exercises every data type and byte/word order the daemon decodes:

| table | address | metric | type | byte/word order | scale, offset |
|---|---|---|---|---|---|
| holding | 0-1 | motor.temperature (°C) | float32 | big/big (ABCD) | |
| holding | 2-3 | motor.vibration (mm/s) | float32 | big/little (CDAB) | |
| holding | 4-5 | motor.rpm | int32 | little/little (DCBA) | * 0.1 |
| holding | 6 | motor.torque (N·m) | int16 | little (BA) | * 0.1 |
| holding | 7-8 | motor.run_hours | uint32 | little/big (BADC) | * 1/3600 (seconds → hours) |
| holding | 10 | motor.status | bool (register ≠ 0) | | |
| input | 0 | tank.level (%) | uint16 | big | * 0.01 |
| input | 1 | tank.temperature (°C) | uint16 | big | * 0.1 - 273.15 (0.1 K → °C) |
| input | 2 | tank.pressure (bar) | int16 | big | * 0.001 |
| input | 3-6 | tank.volume (m³) | float64 | big/big | |
| input | 7-10 | tank.flow (m³/s) | float64 | little/little | |
| coil | 0 | motor.running | bool | | |
| discrete | 0, 1, 2 | tank.high_alarm, tank.low_alarm, tank.inlet_open | bool | | |

Holding register 9 is reserved (always 0). Addresses past each table's end are unmapped: reading
them is an "illegal data address" exception response. With `bench_registers=N`, holding registers
1000…1000+N-1 hold static uint16 values `(address * 7) & 0xFFFF` for the benchmark (`bench_profile()`).

In static mode the registers hold `STATIC_VALUES` forever (tests know what the daemon must read);
otherwise they follow `signals.MotorSignal`/`TankSignal` every `update_ms` (1 s by default, the
pace those signals are made for), with the motor's occasional bearing knocks, rare pressure spikes
and, with `dropout_rate`, reads that now and then answer "device busy". `stall` (settable while
running) delays every answer by `stall_s`, so a client times out, as behind a dead gateway.

Run it: `python -m ingest_daemons.simulators.modbus_server --port 5020` (add `--print-profile` for
the daemon profile JSON).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import random
import signal
import threading
import time
from collections.abc import Mapping
from typing import Any

from pymodbus.constants import ExcCodes
from pymodbus.server import ModbusTcpServer
from pymodbus.simulator import DataType, SimData, SimDevice

from ingest_daemons.modbus_codec import CodecError, encode_point
from ingest_daemons.simulators.signals import MotorSignal, TankSignal
from sensormine.devices.profiles import ModbusPoint, ModbusProfile

log = logging.getLogger("sensormine.simulators.modbus")

BENCH_BASE = 1000
"""First holding register of the benchmark block."""

# Function codes that address each table when the simulator writes its own registers.
_WRITE_FC = {"holding": 16, "input": 4, "coil": 15, "discrete": 2}
# Size of each table (registers or bits); reads past the end are exception responses.
_TABLE_SIZE = {"holding": 11, "input": 11, "coil": 16, "discrete": 16}


def register_map() -> list[ModbusPoint]:
    """The simulator's points, as a daemon profile should list them."""
    p = ModbusPoint
    return [
        p(metric="motor.temperature", table="holding", address=0, data_type="float32"),
        p(metric="motor.vibration", table="holding", address=2, data_type="float32", word_order="little"),
        p(
            metric="motor.rpm",
            table="holding",
            address=4,
            data_type="int32",
            byte_order="little",
            word_order="little",
            scale=0.1,
        ),
        p(metric="motor.torque", table="holding", address=6, data_type="int16", byte_order="little", scale=0.1),
        p(
            metric="motor.run_hours",
            table="holding",
            address=7,
            data_type="uint32",
            byte_order="little",
            scale=1 / 3600,
        ),
        p(metric="motor.status", table="holding", address=10, data_type="bool"),
        p(metric="tank.level", table="input", address=0, data_type="uint16", scale=0.01),
        p(metric="tank.temperature", table="input", address=1, data_type="uint16", scale=0.1, offset=-273.15),
        p(metric="tank.pressure", table="input", address=2, data_type="int16", scale=0.001),
        p(metric="tank.volume", table="input", address=3, data_type="float64"),
        p(
            metric="tank.flow",
            table="input",
            address=7,
            data_type="float64",
            byte_order="little",
            word_order="little",
        ),
        p(metric="motor.running", table="coil", address=0, data_type="bool"),
        p(metric="tank.high_alarm", table="discrete", address=0, data_type="bool"),
        p(metric="tank.low_alarm", table="discrete", address=1, data_type="bool"),
        p(metric="tank.inlet_open", table="discrete", address=2, data_type="bool"),
    ]


STATIC_VALUES: dict[str, float] = {
    "motor.temperature": 47.3,  # not exact in float32: the daemon reads 47.29999923706055
    "motor.vibration": 2.71828,
    "motor.rpm": 1480.5,
    "motor.torque": -42.7,
    "motor.run_hours": 123_456_789 / 3600,
    "motor.status": 1.0,
    "tank.level": 63.27,
    "tank.temperature": 20.05,
    "tank.pressure": 1.617,
    "tank.volume": 12.345678901234,
    "tank.flow": -0.0035,
    "motor.running": 1.0,
    "tank.high_alarm": 0.0,
    "tank.low_alarm": 0.0,
    "tank.inlet_open": 1.0,
}
"""What the registers hold in static mode (engineering values, before encoding)."""


def bench_points(count: int) -> list[ModbusPoint]:
    """`count` uint16 points over the benchmark block (one metric per register)."""
    return [
        ModbusPoint(metric=f"bench.r{a}", table="holding", address=a, data_type="uint16")
        for a in range(BENCH_BASE, BENCH_BASE + count)
    ]


def bench_register_value(address: int) -> int:
    """The static content of a benchmark register."""
    return (address * 7) & 0xFFFF


class ModbusSimulator:
    """The server plus the task that moves its registers; create, `await start()`, `await stop()`."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        unit_id: int = 1,
        static: bool = False,
        update_ms: int = 1000,
        seed: int = 1,
        bench_registers: int = 0,
        dropout_rate: float = 0.0,
        spike_rate: float = 0.002,
        stall_s: float = 5.0,
    ) -> None:
        self.host = host
        self.port = port
        self.unit_id = unit_id
        self.static = static
        self.update_ms = update_ms
        self.bench_registers = bench_registers
        self.dropout_rate = dropout_rate
        self.spike_rate = spike_rate
        self.stall = False
        self.stall_s = stall_s
        self.points = {p.metric: p for p in register_map()}
        self.values: dict[str, float] = dict(STATIC_VALUES)
        self.requests = 0
        self._rng = random.Random(seed)
        self._motor = MotorSignal(seed)
        self._tank = TankSignal(seed + 1)
        self._run_seconds = 123_456_789.0
        self._server: ModbusTcpServer | None = None
        self._updater: asyncio.Task[None] | None = None

    def _initial_blocks(self) -> tuple[list[SimData], list[SimData], list[SimData], list[SimData]]:
        regs: dict[str, list[int]] = {t: [0] * _TABLE_SIZE[t] for t in ("holding", "input")}
        bits: dict[str, list[bool]] = {t: [False] * _TABLE_SIZE[t] for t in ("coil", "discrete")}
        for metric, value in self.values.items():
            p = self.points[metric]
            words = encode_point(p, value)
            if p.table in bits:
                bits[p.table][p.address] = bool(words[0])
            else:
                regs[p.table][p.address : p.address + len(words)] = words
        holding = [SimData(address=0, values=regs["holding"], datatype=DataType.REGISTERS)]
        if self.bench_registers:
            addresses = range(BENCH_BASE, BENCH_BASE + self.bench_registers)
            holding.append(
                SimData(
                    address=BENCH_BASE, values=[bench_register_value(a) for a in addresses], datatype=DataType.REGISTERS
                )
            )
        return (
            [SimData(address=0, values=bits["coil"], datatype=DataType.BITS)],
            [SimData(address=0, values=bits["discrete"], datatype=DataType.BITS)],
            holding,
            [SimData(address=0, values=regs["input"], datatype=DataType.REGISTERS)],
        )

    async def _on_access(
        self,
        function_code: int,
        start_address: int,
        address: int,
        count: int,
        registers: list[int],
        set_values: list[int] | list[bool] | None,
    ) -> ExcCodes | None:
        if set_values is not None:  # our own register updates
            return None
        self.requests += 1
        if self.stall:
            await asyncio.sleep(self.stall_s)
        if self.dropout_rate and self._rng.random() < self.dropout_rate:
            return ExcCodes.DEVICE_BUSY
        return None

    async def start(self) -> int:
        """Listen (on a free port when `port` is 0) and start moving the registers; returns the port."""
        if not self.static:
            self.values.update(self.sample(time.time(), 0.0))
        device = SimDevice(id=self.unit_id, simdata=self._initial_blocks(), action=self._on_access)
        self._server = ModbusTcpServer(device, address=(self.host, self.port))
        await self._server.serve_forever(background=True)
        transport: Any = self._server.transport  # an asyncio Server once listening
        self.port = transport.sockets[0].getsockname()[1]
        if not self.static:
            self._updater = asyncio.create_task(self._update_forever())
        log.info("modbus simulator listening on %s:%d (unit %d)", self.host, self.port, self.unit_id)
        return self.port

    async def stop(self) -> None:
        """Stop updating and close the server."""
        if self._updater is not None:
            self._updater.cancel()
            await asyncio.gather(self._updater, return_exceptions=True)
        if self._server is not None:
            await self._server.shutdown()

    async def write_values(self, values: Mapping[str, float]) -> None:
        """Put engineering values into the registers of the named points."""
        assert self._server is not None, "start() first"
        for metric, value in values.items():
            p = self.points[metric]
            try:
                words = encode_point(p, value)
            except CodecError:
                log.debug("%s=%r does not fit %s; register left as it was", metric, value, p.data_type)
                continue
            self.values[metric] = value
            payload: list[int] | list[bool] = [bool(w) for w in words] if p.table in ("coil", "discrete") else words
            await self._server.async_setValues(self.unit_id, _WRITE_FC[p.table], p.address, payload)

    def sample(self, t: float, dt: float) -> dict[str, float]:
        """The motor and tank at time t (seconds), dt after the previous sample."""
        motor = self._motor.sample(t)
        tank = self._tank.sample(t)
        pressure = tank["pressure"] - 1.0  # gauge
        if self._rng.random() < self.spike_rate:
            pressure += 0.5  # a pressure hammer
        self._run_seconds += max(0.0, dt)
        volume = tank["level"] / 100 * 20.0
        # d(volume)/dt of TankSignal's level (50 + 40 sin(t/600 + seed) % of a 20 m³ tank), plus noise.
        flow = 0.2 * 40 / 600 * math.cos(t / 600 + self._tank.seed) + self._rng.gauss(0, 0.0005)
        return {
            "motor.temperature": motor["temperature"],
            "motor.vibration": motor["vibration"],
            "motor.rpm": motor["rpm"],
            "motor.torque": round(motor["rpm"] / 30 + self._rng.gauss(0, 0.5), 1),
            "motor.run_hours": self._run_seconds / 3600,
            "motor.status": 1.0,
            "motor.running": 1.0,
            "tank.level": tank["level"],
            "tank.temperature": round(18 + 2 * math.sin(t / 3600) + self._rng.gauss(0, 0.05), 1),
            "tank.pressure": round(pressure, 3),
            "tank.volume": volume,
            "tank.flow": flow,
            "tank.high_alarm": 1.0 if tank["level"] > 85 else 0.0,
            "tank.low_alarm": 1.0 if tank["level"] < 15 else 0.0,
            "tank.inlet_open": 1.0 if flow > 0 else 0.0,
        }

    async def _update_forever(self) -> None:
        last = time.time()
        while True:
            await asyncio.sleep(self.update_ms / 1000)
            now = time.time()
            try:
                await self.write_values(self.sample(now, now - last))
            except Exception:  # a simulator glitch must not stop the device
                log.exception("register update failed")
            last = now

    def profile(self, **overrides: object) -> ModbusProfile:
        """The daemon profile that reads this simulator's register map (fields overridable)."""
        data: dict[str, object] = {
            "host": self.host,
            "port": self.port,
            "unit_id": self.unit_id,
            "points": register_map(),
        }
        data.update(overrides)
        return ModbusProfile.model_validate(data)

    def bench_profile(self, count: int | None = None, **overrides: object) -> ModbusProfile:
        """A profile polling `count` (default all) benchmark registers."""
        n = self.bench_registers if count is None else count
        data: dict[str, object] = {"host": self.host, "port": self.port, "unit_id": self.unit_id}
        data["points"] = bench_points(n)
        data.update(overrides)
        return ModbusProfile.model_validate(data)


class SimulatorThread:
    """A `ModbusSimulator` on its own thread and event loop, for tests and tools that are not async."""

    def __init__(self, **kwargs: object) -> None:
        self.simulator = ModbusSimulator(**kwargs)  # type: ignore[arg-type]
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="modbus-simulator", daemon=True)

    @property
    def port(self) -> int:
        """The port it listens on."""
        return self.simulator.port

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self.simulator.start())
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            return
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self.simulator.stop())
        # Answers still pending (a stalled simulator's) end with the loop.
        pending = asyncio.all_tasks(self._loop)
        for task in pending:
            task.cancel()
        self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        self._loop.close()

    def start(self) -> SimulatorThread:
        """Start serving; returns once it listens."""
        self._thread.start()
        self._ready.wait(10)
        if self._error is not None:
            raise RuntimeError(f"modbus simulator failed to start: {self._error}") from self._error
        return self

    def write_values(self, values: Mapping[str, float]) -> None:
        """Put engineering values into registers (see `ModbusSimulator.write_values`)."""
        asyncio.run_coroutine_threadsafe(self.simulator.write_values(values), self._loop).result(10)

    def set_stall(self, stall: bool) -> None:
        """Make every answer late (True) or on time again (False)."""
        self._loop.call_soon_threadsafe(setattr, self.simulator, "stall", stall)

    def stop(self) -> None:
        """Close the server and end the thread."""
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)


async def _serve(args: argparse.Namespace) -> None:
    sim = ModbusSimulator(
        host=args.host,
        port=args.port,
        unit_id=args.unit_id,
        static=args.static,
        update_ms=args.update_ms,
        seed=args.seed,
        bench_registers=args.bench_registers,
        dropout_rate=args.dropout_rate,
    )
    port = await sim.start()
    print(f"modbus simulator listening on {args.host}:{port}", flush=True)
    if args.print_profile:
        print(json.dumps(sim.profile().model_dump(mode="json")), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await sim.stop()


def main(argv: list[str] | None = None) -> None:
    """Run the simulator until SIGTERM/SIGINT."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5020, help="0 picks a free port (printed)")
    parser.add_argument("--unit-id", type=int, default=1)
    parser.add_argument("--static", action="store_true", help="hold STATIC_VALUES instead of moving signals")
    parser.add_argument("--update-ms", type=int, default=1000, help="how often the signals move")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--bench-registers", type=int, default=0, help="extra uint16 registers from 1000")
    parser.add_argument("--dropout-rate", type=float, default=0.001, help="share of reads answered 'device busy'")
    parser.add_argument("--print-profile", action="store_true", help="print the daemon profile JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("pymodbus").setLevel(logging.WARNING)
    asyncio.run(_serve(args))


if __name__ == "__main__":
    main()
