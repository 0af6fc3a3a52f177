"""What a monitored run's topology did, kept small: first and last values per layer, the scales'
range, and the verdict written at the end of a run."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

__all__ = ["RunHistory", "SATURATED_ENTROPY", "Alert", "AlertWatch", "COLLAPSE_FALL", "COINCIDENT",
           "STILL_MEASUREMENTS"]

SATURATED_ENTROPY = 0.999
"""Normalized entropy above which a layer reads as a random, even cloud: a penalty maximising it
has almost nothing left to gain (PyTorch's default initialisation gives 0.9997–0.99999)."""


COLLAPSE_FALL = 0.1
"""A collapse alert fires when a layer's spread falls below this fraction of its first logged value
(an order of magnitude: the drift of a tiny initialisation's plateau, dying neurons pulled together)."""

COINCIDENT = 1e-6
"""Neurons closer than this fraction of the layer's RMS neuron norm coincide (copies, or neurons
that never separated after zero initialisation)."""


STILL_MEASUREMENTS = 2
"""A still alert fires when a layer's weights are exactly what they were this many measurements
in a row: the layer is frozen, or no gradient reaches it (every unit dead)."""


def _fingerprint(cloud) -> float:
    """One number that any change of the cloud changes (a sum against fixed pseudo-random
    weights), without keeping a copy of the layer."""
    import torch

    flat = cloud.detach().reshape(-1).double()
    weights = torch.sin(torch.arange(flat.numel(), device=flat.device, dtype=torch.float64) * 12.9898 + 0.5)
    return float((flat * weights).sum())


@dataclass(frozen=True)
class Alert:
    """One alert about one layer."""

    kind: str  # "collapse", "coincident" or "still"
    layer: str
    step: int
    message: str


@dataclass
class AlertWatch:
    """One layer's alert state: each alert fires once, and again only after its cause went away
    (collapse, still) or grew by a tenth of the layer (coincident neurons)."""

    first_spread: float | None = None
    collapsed: bool = False
    coincident: int = 0
    fingerprint: float | None = None
    unchanged: int = 0
    still: bool = False

    def update(self, layer: str, step: int, values: Mapping[str, float], deaths, cloud=None) -> list[Alert]:
        alerts = []
        if cloud is not None and cloud.numel() and not hasattr(cloud, "placements"):  # a shard: not its whole
            alerts += self._still(layer, step, _fingerprint(cloud))
        spread = values.get("spread")
        if spread is not None:
            if self.first_spread is None:
                self.first_spread = spread
            elif self.first_spread > 0:
                if not self.collapsed and spread < COLLAPSE_FALL * self.first_spread:
                    self.collapsed = True
                    alerts.append(Alert("collapse", layer, step,
                                        f"step {step}: layer {layer or 'model'} is collapsing: its spread fell from "
                                        f"{self.first_spread:.3g} to {spread:.3g} (neurons drawing together)"))
                elif self.collapsed and spread > 0.5 * self.first_spread:
                    self.collapsed = False
        n = deaths.numel() + 1
        if spread is not None and deaths.numel():
            mean = float(deaths.double().mean())
            rms = mean / spread if spread > 0 else 0.0
            count = int((deaths.double() <= COINCIDENT * rms).sum()) if rms > 0 else deaths.numel()
            if count > self.coincident and (self.coincident == 0 or count - self.coincident >= 0.1 * n):
                alerts.append(Alert("coincident", layer, step,
                                    f"step {step}: layer {layer or 'model'}: {count} of its {n} neurons duplicate "
                                    f"another (copies, or neurons that never separated)"))
                self.coincident = count
        return alerts

    def _still(self, layer: str, step: int, fingerprint: float) -> list[Alert]:
        """A layer whose weights did not change over `STILL_MEASUREMENTS` measurements in a row."""
        if self.fingerprint is not None and fingerprint == self.fingerprint:
            self.unchanged += 1
        else:
            self.unchanged, self.still = 0, False
        previous, self.fingerprint = self.fingerprint, fingerprint
        if previous is None or self.still or self.unchanged < STILL_MEASUREMENTS:
            return []
        self.still = True
        return [Alert("still", layer, step,
                      f"step {step}: layer {layer or 'model'} has not changed for {self.unchanged} measurements: "
                      f"it is frozen, or no gradient reaches it (every unit dead)")]


@dataclass
class RunHistory:
    """First and last logged values of each layer's series, and each layer's scale range."""

    first: dict[str, dict[str, float]] = field(default_factory=dict)
    last: dict[str, dict[str, float]] = field(default_factory=dict)
    lowest: dict[str, dict[str, float]] = field(default_factory=dict)
    scales: dict[str, tuple[float, float]] = field(default_factory=dict)
    steps: list[int] = field(default_factory=list)

    def record(self, layer: str, values: Mapping[str, float], step: int) -> None:
        if not self.steps or self.steps[-1] != step:
            self.steps.append(step)
        self.first.setdefault(layer, dict(values))
        self.last[layer] = dict(values)
        low = self.lowest.setdefault(layer, dict(values))
        for key, value in values.items():
            low[key] = min(low.get(key, value), value)

    def record_scale(self, layer: str, scale: float) -> None:
        low, high = self.scales.get(layer, (scale, scale))
        self.scales[layer] = (min(low, scale), max(high, scale))

    def verdict(self, events: Sequence = (), skipped: Mapping[str, str] | None = None,
                has_optimizer: bool = False, alerts: Sequence[Alert] = ()) -> str:
        """A few plain lines: per layer its signals from first to last measurement, then what
        the optimizer did, the events raised and the layers skipped."""
        lines = [f"topology over steps {self.steps[0]}–{self.steps[-1]} ({len(self.steps)} measurements):"]
        for layer, first in self.first.items():
            last = self.last[layer]
            parts = []
            if "spread" in first and "spread" in last:
                parts.append(f"spread {first['spread']:.3g} → {last['spread']:.3g}")
            if "entropy_deficit" in first and "entropy_deficit" in last:
                parts.append(f"entropy deficit {first['entropy_deficit']:.2g} → {last['entropy_deficit']:.2g}")
            elif "normalized_entropy" in first and "normalized_entropy" in last:
                parts.append(f"normalized entropy {first['normalized_entropy']:.4f} → {last['normalized_entropy']:.4f}")
            if "groups" in last:
                parts.append(f"groups {first.get('groups', 1):.0f} → {last['groups']:.0f}")
            lines.append(f"  {layer or 'model'}: " + ", ".join(parts))
        entropies = [v["normalized_entropy"] for v in self.lowest.values() if "normalized_entropy" in v]
        if entropies and min(entropies) > SATURATED_ENTROPY:
            lines.append(f"normalized entropy stayed above {SATURATED_ENTROPY} in every layer: a penalty maximising "
                         f"it was saturated (nothing to gain), and entropy-based scales sat at 1; watch spread")
        if has_optimizer:
            if self.scales:
                worst = max(self.scales, key=lambda k: max(abs(self.scales[k][0] - 1), abs(self.scales[k][1] - 1)))
                low, high = self.scales[worst]
                change = 100 * max(abs(low - 1), abs(high - 1))
                lines.append("TopoOptimizer did not change any step (every scale 1)" if change == 0 else
                             f"TopoOptimizer changed steps by at most {change:.2g}% (layer {worst}: scales "
                             f"{low:.4g}–{high:.4g})")
        if events:
            shown = ", ".join(f"{e.layer}@{e.step} ({e.groups_before}→{e.groups})" for e in list(events)[:5])
            lines.append(f"branching events: {len(events)}: {shown}{' …' if len(events) > 5 else ''}")
        else:
            lines.append("no branching event")
        for alert in list(alerts)[:5]:
            lines.append(f"alert: {alert.message}")
        if len(alerts) > 5:
            lines.append(f"… and {len(alerts) - 5} more alerts")
        for layer, reason in (skipped or {}).items():
            lines.append(f"skipped {layer}: {reason}")
        return "\n".join(lines)
