"""The locomotion rewards R_α = velocity − α Σ_t ‖a_t‖² and their mapping onto a Brax env's kwargs.

An expert's reward is one α (risky: α = 0; cautious: α = 1); a MORL run mixes the experts' rewards with weights μ:
Σ_i μ_i R_{α_i} = (Σ μ_i) · velocity − (Σ μ_i α_i) · Σ‖a‖², so μ = (0.5, 0.5) of (risky, cautious) is α = 0.5.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from soups.utils import SoupsError

# The thesis' two experts (§6.3.4).
ALPHAS: dict[str, float] = {"risky": 0.0, "cautious": 1.0}


def env_reward_kwargs(alphas: Sequence[float], weights: Sequence[float] | None = None) -> dict[str, float]:
    """The env kwargs of Σ_i μ_i R_{α_i}: {"forward_reward_weight": Σ μ_i, "ctrl_cost_weight": Σ μ_i α_i}.

    Args:
        alphas: α_i of every reward mixed (one for an expert).
        weights: μ (same length, ≥ 0, sum 1); None for a single reward.

    Raises:
        SoupsError: a negative or non-finite α, weights of the wrong length, negative, or not summing to 1.
    """
    alphas = [float(a) for a in alphas]
    if not alphas or any(not math.isfinite(a) or a < 0 for a in alphas):
        raise SoupsError(f"reward alphas={alphas} must be finite and ≥ 0 (α weighs the control cost)")
    if weights is None:
        if len(alphas) != 1:
            raise SoupsError(f"{len(alphas)} alphas need reward.weights (MORL μ), one per alpha")
        weights = [1.0]
    weights = [float(w) for w in weights]
    if len(weights) != len(alphas):
        raise SoupsError(f"reward.weights={weights} has {len(weights)} entries for {len(alphas)} alphas {alphas}")
    if any(not math.isfinite(w) or w < 0 for w in weights) or abs(sum(weights) - 1.0) > 1e-6:
        raise SoupsError(f"reward.weights={weights} must be ≥ 0 and sum to 1")
    return {"forward_reward_weight": sum(weights),
            "ctrl_cost_weight": sum(w * a for w, a in zip(weights, alphas))}  # fmt: skip


def return_of(velocity: float, control: float, alpha: float) -> float:
    """R_α's return from the two objectives: velocity + α · control (control = −Σ‖a‖²)."""
    return velocity + alpha * control
