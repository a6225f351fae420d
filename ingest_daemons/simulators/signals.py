"""Plausible machine signals for simulated devices: slow drift, noise, cycles and rare spikes."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field


@dataclass
class MotorSignal:
    """A motor: winding temperature drifting with load, vibration, rpm around a set point."""

    seed: int
    rng: random.Random = field(init=False)
    temperature: float = 45.0

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def sample(self, t: float) -> dict[str, float]:
        """Values at time t (seconds)."""
        load = 0.6 + 0.3 * math.sin(t / 300 + self.seed)
        self.temperature += (40 + 30 * load - self.temperature) * 0.01 + self.rng.gauss(0, 0.05)
        vibration = 2.0 + 1.5 * load + self.rng.gauss(0, 0.2)
        if self.rng.random() < 0.002:  # occasional bearing knock
            vibration *= 4
        rpm = 1480 * load / 0.6 + self.rng.gauss(0, 5)
        return {"temperature": round(self.temperature, 3), "vibration": round(vibration, 4), "rpm": round(rpm, 1)}


@dataclass
class TankSignal:
    """A tank: level filling and draining in cycles, pressure following level."""

    seed: int
    rng: random.Random = field(init=False)

    def __post_init__(self) -> None:
        self.rng = random.Random(self.seed)

    def sample(self, t: float) -> dict[str, float]:
        """Values at time t (seconds)."""
        level = 50 + 40 * math.sin(t / 600 + self.seed)
        pressure = 1.0 + level * 0.0098 + self.rng.gauss(0, 0.002)
        return {"level": round(level, 2), "pressure": round(pressure, 4)}
