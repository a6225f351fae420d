"""Simulated OPC UA server (asyncua): motors and tanks with realistic signals, spikes and dropouts.

Every simulated device is an object in namespace `urn:sensormine:simulator` with one Double variable
per signal, node ids `ns=2;s=<device>.<signal>`:

- `motor-N`: `temperature` (slow drift with load), `vibration`, `rpm`, and `state`, a String
  ("running"/"stopped") that is not a number, as real servers expose;
- `tank-N`: `level` and `pressure`;
- optionally `extra.NNNNN`: any number of extra Double variables (5 000 for the benchmark), in
  folders `extra-000`, `extra-001`, ... of 100 each.

Each tick writes a new value to every variable. Now and then a device spikes (one signal jumps to
1.5-3x) and a variable drops out: it goes Bad (`BadSensorFailure`, no value, as the spec wants)
for one to three ticks, then comes back Good.

With a seed the simulator is deterministic: the same seed gives the same values, and signal time
runs from 0 in steps of the tick interval, with source timestamps `start_us + tick * interval`.
Tests drive it tick by tick (`tick()`) and read back what was written (`history`). Without a seed
it follows the wall clock. Run it alone with::

    python -m ingest_daemons.simulators.opcua_server --port 4840 --motors 2 --tanks 2 --interval 1
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import json
import logging
import math
import random
import signal
import threading
import time
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar, cast

from asyncua import Server, ua
from asyncua.crypto.permission_rules import User, UserRole
from asyncua.server.monitored_item_service import MonitoredItemValues
from asyncua.server.user_managers import UserManager

from ingest_daemons.simulators.signals import MotorSignal, TankSignal
from sensormine.reading import datetime_to_us, now_us, us_to_datetime

log = logging.getLogger("sensormine.sim.opcua")

NAMESPACE_URI = "urn:sensormine:simulator"
MOTOR_SIGNALS = ("temperature", "vibration", "rpm")
TANK_SIGNALS = ("level", "pressure")
DROPOUT_STATUS = ua.StatusCodes.BadSensorFailure
_T = TypeVar("_T")


@dataclass(frozen=True)
class Written:
    """One value the simulator wrote: what a subscriber should be told."""

    node_id: str
    tick: int
    ts_us: int
    value: float | str | None
    status: int  # OPC UA StatusCode value; 0 is Good


@dataclass
class _Variable:
    node_id: ua.NodeId
    device: str
    signal: str
    current: float | str
    dropout_left: int = 0  # ticks still to stay Bad


def _node_id(name: str, ns: int) -> ua.NodeId:
    return ua.NodeId(ua.String(name), ua.Int16(ns))


def _std_node(object_id: int) -> ua.NodeId:
    return ua.NodeId(ua.Int32(object_id))


def _data_value(value: float | str | None, status: int, ts: datetime) -> ua.DataValue:
    """A value as written: Bad statuses carry no value (Part 4, 7.7.1)."""
    if value is None:
        variant = ua.Variant(None)
    else:
        variant = ua.Variant(value, ua.VariantType.String if isinstance(value, str) else ua.VariantType.Double)
    return ua.DataValue(variant, ua.StatusCode(ua.UInt32(status)), SourceTimestamp=cast(ua.DateTime, ts))


def _extra_folder(i: int) -> str:
    # Extra variables sit in folders of 100: asyncua adds a child in time linear in its siblings.
    return f"extra-{i // 100:03d}"


class _PasswordUsers(UserManager):
    """Accepts exactly the configured username/password pairs."""

    def __init__(self, users: dict[str, str]) -> None:
        self.users = users

    def get_user(
        self, iserver: Any, username: str | None = None, password: str | None = None, certificate: Any = None
    ) -> User | None:
        if username is not None and self.users.get(username) == password:
            return User(role=UserRole.User, name=username)
        return None


@dataclass
class SimulatorConfig:
    """What to simulate and how (see the module docstring)."""

    motors: int = 1
    tanks: int = 1
    extra: int = 0
    interval_s: float = 1.0
    seed: int | None = None
    spike_rate: float = 0.01  # per device per tick
    dropout_rate: float = 0.005  # per variable per tick
    host: str = "127.0.0.1"
    port: int = 0  # 0: any free port (see `endpoint` once started)
    users: dict[str, str] = field(default_factory=dict)  # username -> password; empty: anonymous allowed
    certificate_path: str | None = None  # with a private key: also offer Basic256Sha256 Sign/SignAndEncrypt
    private_key_path: str | None = None
    record: bool = False  # keep every write in `history` (tests)
    start_us: int | None = None  # deterministic mode: source timestamp of tick 0 (default: now, whole ms)
    fast: bool = False  # skip asyncua's per-notification deepcopy (see `skip_notification_copies`)


def skip_notification_copies() -> None:
    """Make asyncua's server keep each monitored value as written instead of deep-copying it (process-wide).

    asyncua deep-copies every value a monitored item reports, in case the writer mutates it
    afterwards; that copy is most of a write's cost (~5 000 monitored writes/s per core). The
    simulator writes a new DataValue every time and never touches it again, so the copy buys
    nothing here; benchmarks use this so that the simulator, not the daemon, stops being the limit.
    """

    def set_current_datavalue(self: MonitoredItemValues, cur_val: ua.DataValue) -> None:
        self.old_dvalue = self.current_dvalue
        self.current_dvalue = cur_val

    MonitoredItemValues.set_current_datavalue = set_current_datavalue  # type: ignore[method-assign]


class OpcUaSimulator:
    """An asyncua server whose variables follow simulated signals; use from one asyncio loop."""

    def __init__(self, config: SimulatorConfig | None = None) -> None:
        self.config = cfg = config or SimulatorConfig()
        self.deterministic = cfg.seed is not None
        self.rng = random.Random(cfg.seed)
        base_seed = cfg.seed if cfg.seed is not None else self.rng.randrange(1 << 30)
        self.start_us = cfg.start_us if cfg.start_us is not None else now_us() // 1000 * 1000
        self.motors = [(f"motor-{i + 1}", MotorSignal(base_seed + i)) for i in range(cfg.motors)]
        self.tanks = [(f"tank-{i + 1}", TankSignal(base_seed + 1000 + i)) for i in range(cfg.tanks)]
        self.tick_no = 0
        self.history: list[Written] = []
        self.server: Server | None = None
        self.port = cfg.port
        self.ns = 2
        self._vars: list[_Variable] = []
        self._stopped_motors: set[str] = set()

    # --- address space -------------------------------------------------------------------------

    @property
    def endpoint(self) -> str:
        """The URL clients connect to (known once started)."""
        return f"opc.tcp://{self.config.host}:{self.port}/sensormine/sim"

    def node_ids(self) -> dict[str, dict[str, str]]:
        """Node ids by device then signal, as strings (`ns=2;s=motor-1.temperature`)."""
        out: dict[str, dict[str, str]] = {}
        for v in self._vars:
            out.setdefault(v.device, {})[v.signal] = v.node_id.to_string()
        return out

    def profile(self, device: str, **node_options: Any) -> dict[str, Any]:
        """A device profile (JSON form) subscribing to every numeric signal of one simulated device."""
        nodes = [
            {"node_id": node_id, "metric": signal, **node_options}
            for signal, node_id in self.node_ids()[device].items()
            if signal != "state"
        ]
        return {"protocol": "opcua", "endpoint": self.endpoint, "nodes": nodes}

    def _initial_values(self) -> None:
        values = self._sample(0.0)
        self._vars = []
        for device, _ in self.motors:
            for name in (*MOTOR_SIGNALS, "state"):
                self._vars.append(_Variable(_node_id(f"{device}.{name}", self.ns), device, name, 0.0))
        for device, _ in self.tanks:
            for name in TANK_SIGNALS:
                self._vars.append(_Variable(_node_id(f"{device}.{name}", self.ns), device, name, 0.0))
        for i in range(self.config.extra):
            self._vars.append(_Variable(_node_id(f"extra.{i:05d}", self.ns), _extra_folder(i), f"{i:05d}", 0.0))
        for v in self._vars:
            v.current = values[(v.device, v.signal)]

    async def start(self) -> OpcUaSimulator:
        """Build the address space (first start: tick 0 values) and listen."""
        if not self._vars:
            self._initial_values()
            self._record_all(0, self._ts_us(0))
        cfg = self.config
        if cfg.fast:
            skip_notification_copies()
        server = Server(user_manager=_PasswordUsers(cfg.users) if cfg.users else None)
        await server.init()
        server.set_endpoint(f"opc.tcp://{cfg.host}:{self.port}/sensormine/sim")
        server.set_server_name("Sensormine OPC UA simulator")
        policies = [ua.SecurityPolicyType.NoSecurity]
        if cfg.certificate_path and cfg.private_key_path:
            await server.load_certificate(cfg.certificate_path)
            await server.load_private_key(cfg.private_key_path)
            policies += [
                ua.SecurityPolicyType.Basic256Sha256_Sign,
                ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt,
            ]
        server.set_security_policy(policies)
        server.set_identity_tokens([ua.UserNameIdentityToken] if cfg.users else [ua.AnonymousIdentityToken])
        if await server.register_namespace(NAMESPACE_URI) != self.ns:  # node ids were made with it
            raise RuntimeError("the simulator's namespace is not ns=2")
        await self._add_variables(server)
        await server.start()
        assert server.bserver is not None
        self.port = server.bserver.port
        self.server = server
        log.info("OPC UA simulator listening on %s (%d variables)", self.endpoint, len(self._vars))
        return self

    async def _add_variables(self, server: Server) -> None:
        # One AddNodes call for all variables: node by node, 5 000 variables take ~20 s to create.
        folders = {v.device: _node_id(v.device, self.ns) for v in self._vars}
        for device, folder_id in folders.items():
            await server.nodes.objects.add_object(folder_id, device)
        items = []
        for v in self._vars:
            is_text = v.signal == "state"
            attrs = ua.VariableAttributes(
                DisplayName=ua.LocalizedText(v.signal),
                Description=ua.LocalizedText(v.signal),
                DataType=_std_node(ua.ObjectIds.String if is_text else ua.ObjectIds.Double),
                Value=ua.Variant(v.current, ua.VariantType.String if is_text else ua.VariantType.Double),
                ValueRank=ua.ValueRank.Scalar,
                AccessLevel=ua.AccessLevel.CurrentRead.mask,
                UserAccessLevel=ua.AccessLevel.CurrentRead.mask,
            )
            items.append(
                ua.AddNodesItem(
                    ParentNodeId=folders[v.device],
                    ReferenceTypeId=_std_node(ua.ObjectIds.HasComponent),
                    RequestedNewNodeId=v.node_id,
                    BrowseName=ua.QualifiedName(v.signal, self.ns),
                    NodeClass=ua.NodeClass.Variable,
                    NodeAttributes=attrs,
                    TypeDefinition=_std_node(ua.ObjectIds.BaseDataVariableType),
                )
            )
        for result in await server.iserver.isession.add_nodes(items):
            result.StatusCode.check()
        ts = us_to_datetime(self._ts_us(self.tick_no))
        for v in self._vars:  # restarted in the middle of a dropout: still Bad
            value, status = (None, DROPOUT_STATUS) if v.dropout_left else (v.current, 0)
            await server.write_attribute_value(v.node_id, _data_value(value, status, ts))

    async def stop(self) -> None:
        """Stop listening (clients see the connection drop); values are kept for a restart."""
        if self.server is not None:
            await self.server.stop()
            self.server = None

    # --- signals -------------------------------------------------------------------------------

    def _ts_us(self, tick: int) -> int:
        if self.deterministic:
            return self.start_us + round(tick * self.config.interval_s * 1_000_000)
        return now_us()

    def _sample(self, t: float) -> dict[tuple[str, str], float | str]:
        values: dict[tuple[str, str], float | str] = {}
        for device, motor in self.motors:
            sample = motor.sample(t)
            if device in self._stopped_motors:
                sample["rpm"] = 0.0
            if self.rng.random() < self.config.spike_rate:
                name = self.rng.choice(MOTOR_SIGNALS)
                sample[name] = round(sample[name] * self.rng.uniform(1.5, 3.0), 4)
            for name, value in sample.items():
                values[(device, name)] = value
            if self.rng.random() < 0.01:  # an operator starts or stops the motor
                self._stopped_motors ^= {device}
            values[(device, "state")] = "stopped" if device in self._stopped_motors else "running"
        for device, tank in self.tanks:
            sample = tank.sample(t)
            if self.rng.random() < self.config.spike_rate:
                name = self.rng.choice(TANK_SIGNALS)
                sample[name] = round(sample[name] * self.rng.uniform(1.5, 3.0), 4)
            for name, value in sample.items():
                values[(device, name)] = value
        for i in range(self.config.extra):
            values[(_extra_folder(i), f"{i:05d}")] = round(100 + 10 * math.sin(t / 60 + i) + self.rng.gauss(0, 0.5), 3)
        return values

    def _record_all(self, tick: int, ts_us: int) -> None:
        if self.config.record:
            for v in self._vars:
                status = DROPOUT_STATUS if v.dropout_left else 0
                self.history.append(Written(v.node_id.to_string(), tick, ts_us, None if status else v.current, status))

    async def tick(self) -> int:
        """Advance one tick: write a new value (or a dropout) to every variable; returns writes made."""
        if self.server is None:
            raise RuntimeError("simulator is not running")
        self.tick_no += 1
        ts_us = self._ts_us(self.tick_no)
        t = self.tick_no * self.config.interval_s if self.deterministic else ts_us / 1e6
        values = self._sample(t)
        ts = us_to_datetime(ts_us)
        write = self.server.write_attribute_value
        for v in self._vars:
            v.current = values[(v.device, v.signal)]
            if v.dropout_left:
                v.dropout_left -= 1
            elif v.signal != "state" and self.rng.random() < self.config.dropout_rate:
                v.dropout_left = self.rng.randint(1, 3)
            value, status = (None, DROPOUT_STATUS) if v.dropout_left else (v.current, 0)
            await write(v.node_id, _data_value(value, status, ts))
        self._record_all(self.tick_no, ts_us)
        return len(self._vars)

    async def set_status(self, node_id: str, status: int, value: float | None = None) -> None:
        """Write one status (and value) to a variable now: tests use it for a Bad or Uncertain quality."""
        if self.server is None:
            raise RuntimeError("simulator is not running")
        ts = datetime.now(UTC)
        await self.server.write_attribute_value(ua.NodeId.from_string(node_id), _data_value(value, status, ts))
        if self.config.record:
            self.history.append(Written(node_id, self.tick_no, datetime_to_us(ts), value, status))

    async def run(self, stop: asyncio.Event) -> int:
        """Tick every `interval_s` (on a fixed schedule) until `stop`; returns the writes made."""
        writes = 0
        next_at = time.monotonic()
        while not stop.is_set():
            writes += await self.tick()
            next_at += self.config.interval_s
            delay = next_at - time.monotonic()
            if delay < 0:  # fell behind: do not try to catch up in a burst
                next_at = time.monotonic()
                delay = 0
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
        return writes


async def _cancel_pending() -> None:
    # Sessions of a stopped asyncua server leave tasks behind; end them before the loop closes.
    tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


class SimulatorThread:
    """The simulator on its own event loop thread, driven from synchronous code (tests, benchmarks)."""

    def __init__(self, config: SimulatorConfig | None = None) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="opcua-sim", daemon=True)
        self._thread.start()
        self.sim = OpcUaSimulator(config)
        self._stop_run: asyncio.Event | None = None
        self._run_future: concurrent.futures.Future[int] | None = None

    def call(self, coro: Coroutine[Any, Any, _T], timeout: float = 60.0) -> _T:
        """Run a coroutine on the simulator's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> SimulatorThread:
        """Start serving."""
        self.call(self.sim.start())
        return self

    def tick(self, n: int = 1, pause_s: float = 0.0) -> None:
        """Advance n ticks, pausing between them."""
        for _ in range(n):
            self.call(self.sim.tick())
            if pause_s:
                time.sleep(pause_s)

    def run_in_background(self) -> None:
        """Tick on the configured interval until `stop_running` (or `close`)."""

        async def _run() -> int:
            self._stop_run = asyncio.Event()
            return await self.sim.run(self._stop_run)

        self._run_future = asyncio.run_coroutine_threadsafe(_run(), self.loop)

    def stop_running(self) -> int:
        """Stop background ticking; returns the writes it made."""
        if self._run_future is None:
            return 0
        while self._stop_run is None:
            time.sleep(0.01)
        self.loop.call_soon_threadsafe(self._stop_run.set)
        writes = self._run_future.result(30)
        self._run_future = None
        return writes

    def restart(self, down_s: float = 0.0) -> None:
        """Stop the server, stay down for `down_s`, start again on the same port with the same values."""
        self.call(self.sim.stop())
        time.sleep(down_s)
        self.call(self.sim.start())

    def close(self) -> None:
        """Stop ticking and serving, and end the thread."""
        self.stop_running()
        self.call(self.sim.stop())
        self.call(_cancel_pending())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()

    def __enter__(self) -> SimulatorThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def _parse_users(pairs: Sequence[str]) -> dict[str, str]:
    users = {}
    for pair in pairs:
        name, sep, password = pair.partition(":")
        if not sep:
            raise SystemExit(f"--user takes NAME:PASSWORD, not {pair!r}")
        users[name] = password
    return users


async def _serve(config: SimulatorConfig, print_profiles: bool) -> None:
    sim = await OpcUaSimulator(config).start()
    if print_profiles:
        for device in [d for d, _ in sim.motors + sim.tanks]:
            print(json.dumps({"device": device, "profile": sim.profile(device)}), flush=True)
    else:
        print(sim.endpoint, flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    started = time.monotonic()
    try:
        writes = await sim.run(stop)
    finally:
        await sim.stop()
    elapsed = time.monotonic() - started
    log.info("wrote %d values in %.1f s (%.0f/s)", writes, elapsed, writes / elapsed if elapsed else 0)


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: serve simulated devices until SIGTERM/SIGINT."""
    parser = argparse.ArgumentParser(description="Simulated OPC UA server: motors and tanks.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=4840, help="0 picks a free port (printed)")
    parser.add_argument("--motors", type=int, default=1)
    parser.add_argument("--tanks", type=int, default=1)
    parser.add_argument("--extra", type=int, default=0, help="extra Double variables (e.g. 5000 for benchmarks)")
    parser.add_argument("--interval", type=float, default=1.0, help="seconds between updates")
    parser.add_argument("--seed", type=int, default=None, help="deterministic values and timestamps")
    parser.add_argument("--spike-rate", type=float, default=0.01)
    parser.add_argument("--dropout-rate", type=float, default=0.005)
    parser.add_argument("--user", action="append", default=[], help="NAME:PASSWORD (disables anonymous)")
    parser.add_argument("--certificate", help="server certificate (enables Basic256Sha256)")
    parser.add_argument("--private-key", help="server private key")
    parser.add_argument("--print-profiles", action="store_true", help="print a device profile per device")
    parser.add_argument("--fast", action="store_true", help="skip asyncua's per-notification copy (benchmarks)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("asyncua").setLevel(logging.WARNING)
    config = SimulatorConfig(
        motors=args.motors,
        tanks=args.tanks,
        extra=args.extra,
        interval_s=args.interval,
        seed=args.seed,
        spike_rate=args.spike_rate,
        dropout_rate=args.dropout_rate,
        host=args.host,
        port=args.port,
        users=_parse_users(args.user),
        certificate_path=args.certificate,
        private_key_path=args.private_key,
        fast=args.fast,
    )
    asyncio.run(_serve(config, args.print_profiles))


if __name__ == "__main__":
    main()
