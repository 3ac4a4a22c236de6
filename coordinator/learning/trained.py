"""A model trained over Flower, as the hub's ServerApp reported it: read, printed, saved.

Kept apart from the Flower plumbing (coordinator/learning/flower/) so the analyst's client
reads a training result without importing anything of Flower's.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class TrainedModel:
    """What a training run produced, as the ServerApp reported it."""

    result: dict[str, Any]
    wall_s: float

    @classmethod
    def from_json(cls, raw: bytes, wall_s: float = 0.0) -> TrainedModel:
        """A result the hub sent (its Train RPC's result_json)."""
        result = json.loads(raw)
        if not isinstance(result, dict) or "coefficients" not in result:
            raise ValueError("not a chc training result")
        return cls(result=result, wall_s=wall_s)

    def to_json(self) -> bytes:
        """The result as the hub sends it."""
        # Not sorted: the coefficients keep the parameter vector's order.
        return json.dumps(self.result).encode()

    @property
    def coefficients(self) -> dict[str, float]:
        """Coefficient by design column (log-odds)."""
        return {str(k): float(v) for k, v in self.result["coefficients"].items()}

    @property
    def held_out_auc(self) -> float:
        """The pooled held-out AUC, from the nodes' DP score histograms."""
        return float(self.result["held_out_auc"])

    @property
    def rho_charged(self) -> dict[str, float]:
        """What each node charged for the whole run."""
        return {n["node"]: float(n["rho_charged"]) for n in self.result["nodes"]}

    def summary(self) -> str:
        """Per-round loss, the held-out AUC and the privacy spent, for people."""
        lines = ["round  training loss (nats/person, noisy)  step size"]
        lines += [f"{r['round']:>5}  {r['loss']:>34.4f}  {r['step_norm']:.3g}" for r in self.rounds]
        sd = float(self.result.get("held_out_auc_noise_sd", math.nan))
        lines.append(
            f"held-out AUC {self.held_out_auc:.3f} (DP noise sd {sd:.3f}) on about "
            f"{self.result['held_out_persons']} persons; trained on about "
            f"{self.result['training_persons']}"
        )
        lines.append(
            "privacy spent (rho): " + ", ".join(f"{n}={r:.4g}" for n, r in self.rho_charged.items())
        )
        if self.result.get("partial"):
            lines.append(f"partial: left out {self.result['left_out']}")
        return "\n".join(lines)

    @property
    def rounds(self) -> list[dict[str, Any]]:
        """Each round's noisy training loss and step size."""
        return list(self.result["rounds"])

    def save(self, path: Path) -> Path:
        """Write the model, its privacy cost and its provenance as JSON."""
        path.write_text(json.dumps({"chc_model": 1, **self.result}, indent=1))
        return path
