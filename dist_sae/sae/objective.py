"""The exact sparse-autoencoder objective (docs/maths.md §1–2), as per-block partial sums.

Everything here works on one block of rows and returns float64 sums; whoever streams the blocks
(the single-process engine, a Ray worker) adds them in work-unit order and calls `finalize`.

    pass 1:  activation sums Σ_i a^(l)(x_i) over all rows        -> ρ̂ = sums / m
    pass 2:  Σ_i ∇θ [ ½‖x̂_i − x_i‖² + Σ_l g^(l)·q(a^(l)_i) ]      with g = β KL′(ρ̂) held fixed
    finalize: J = recon/m + (λ/2)Σ‖W‖² + β Σ KL(ρ‖ρ̂),  ∇J = grad_sum/m + λW

q(a) = a for sigmoid-like units and (1 + a)/2 for tanh, so "inactive" means −1 for tanh.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from dist_sae.config import Config
from dist_sae.sae.model import SparseAutoencoder
from dist_sae.sae.sums import Sums


@dataclass(frozen=True)
class Objective:
    """The penalty terms of J, resolved from the config for a concrete model."""

    kind: str  # kl | l1 | topk | none
    layers: tuple[int, ...]  # encoder layers (1-based) with a penalty
    rho: tuple[float, ...]
    beta: tuple[float, ...]
    clamp_eps: float
    l1: float
    tanh: bool  # KL works on q = (1 + a) / 2
    weight_decay: tuple[float, ...]  # λ per weight matrix W1..WL
    auxk: int = 0  # AuxK: dead units used to reconstruct the residual (top-k only)
    auxk_coef: float = 0.0

    @classmethod
    def from_config(cls, cfg: Config) -> Objective:
        sp = cfg.sparsity
        num_weights = 2 * len(cfg.model.hidden)
        wd = cfg.loss.weight_decay
        return cls(
            kind=sp.kind,
            layers=tuple(sp.layers) if sp.kind != "none" else (),
            rho=tuple(sp.per_layer("rho")),
            beta=tuple(sp.per_layer("beta")),
            clamp_eps=sp.clamp_eps,
            l1=sp.l1,
            tanh=cfg.model.activation == "tanh",
            weight_decay=tuple(wd) if isinstance(wd, list) else (float(wd),) * num_weights,
            auxk=sp.auxk if sp.kind == "topk" else 0,
            auxk_coef=sp.auxk_coef,
        )

    @property
    def uses_rho_hat(self) -> bool:
        """True when pass 2 needs ρ̂ from a pass 1 (KL)."""
        return self.kind == "kl" and bool(self.layers)

    @property
    def q_scale(self) -> float:
        return 0.5 if self.tanh else 1.0

    def q_of_mean(self, mean_activation: np.ndarray) -> np.ndarray:
        """ρ̂ in KL's (0, 1) space from a layer's mean activation."""
        return (1.0 + mean_activation) / 2.0 if self.tanh else mean_activation


# ---- KL ------------------------------------------------------------------------------------


def kl_divergence(rho: float, q: np.ndarray) -> np.ndarray:
    """KL(ρ‖q) element-wise for Bernoulli means, float64."""
    return rho * np.log(rho / q) + (1.0 - rho) * np.log((1.0 - rho) / (1.0 - q))


def kl_derivative(rho: float, q: np.ndarray) -> np.ndarray:
    """d KL(ρ‖q) / dq = −ρ/q + (1−ρ)/(1−q)."""
    return -rho / q + (1.0 - rho) / (1.0 - q)


@dataclass
class SparsityState:
    """What pass 2 needs from pass 1: ρ̂ per penalised layer and the constant g = β KL′(ρ̂)."""

    rho_hat: list[np.ndarray]  # per penalised layer, in KL's q-space, clamped, float64
    g: list[np.ndarray]  # per penalised layer, float64, already scaled by dq/da
    penalty: float  # β Σ KL(ρ‖ρ̂)
    clamped: int  # units whose ρ̂ hit the clamp
    dead: np.ndarray | None = None  # AuxK: (h1,) bool, units that fired on no row of the last pass 1

    def constants(self) -> list[np.ndarray] | None:
        """What pass 2 workers need, as one list of arrays: g per KL layer, then the dead mask if any."""
        consts = list(self.g) + ([self.dead.astype(np.float64)] if self.dead is not None else [])
        return consts or None


def sparsity_state(obj: Objective, layer_means: list[np.ndarray]) -> SparsityState:
    """ρ̂, g and the KL value from mean activations of every encoder layer (raw a, float64).

    Clamped units keep the derivative at the clamp (not zero) so that units pushed to the edge
    are still pulled back towards ρ.
    """
    if not obj.uses_rho_hat:
        return SparsityState([], [], 0.0, 0)
    rho_hats, gs, penalty, clamped = [], [], 0.0, 0
    for layer, rho, beta in zip(obj.layers, obj.rho, obj.beta):
        q_raw = obj.q_of_mean(np.asarray(layer_means[layer - 1], dtype=np.float64))
        q = np.clip(q_raw, obj.clamp_eps, 1.0 - obj.clamp_eps)
        clamped += int(np.count_nonzero(q != q_raw))
        rho_hats.append(q)
        penalty += beta * float(kl_divergence(rho, q).sum())
        gs.append(beta * kl_derivative(rho, q) * obj.q_scale)
    return SparsityState(rho_hats, gs, penalty, clamped)


# ---- finalize ------------------------------------------------------------------------------


@dataclass
class Evaluation:
    """J, its terms and ∇J over the rows that were summed (the whole dataset, or a minibatch)."""

    loss: float
    terms: dict[str, float]  # reconstruction, weight_decay, sparsity
    grad: np.ndarray  # (P,) float64
    rows: int
    layer_means: list[np.ndarray]  # mean raw activation per encoder layer, at θ
    sparsity: SparsityState
    stats: dict[str, float] = field(default_factory=dict)  # fvu, clamped, ...


def split_layers(flat: np.ndarray, hidden: list[int]) -> list[np.ndarray]:
    """Cut a concatenated (Σ h_l,) vector into per-layer pieces."""
    return np.split(flat, np.cumsum(hidden)[:-1])


def weight_decay_vector(model: SparseAutoencoder, obj: Objective) -> np.ndarray:
    """λ on each weight entry of θ (per matrix), 0 on biases: (P,) float64."""
    decay = np.zeros(model.num_params, dtype=np.float64)
    for spec in model.specs:
        if spec.is_weight:
            n = int(np.prod(spec.shape))
            decay[spec.offset : spec.offset + n] = obj.weight_decay[spec.layer - 1]
    return decay


def finalize(
    obj: Objective,
    model: SparseAutoencoder,
    theta: np.ndarray,
    sums: Sums,
    state: SparsityState,
    decay: np.ndarray,
) -> Evaluation:
    """J and ∇J from pass-2 (or one-pass) sums over m rows, the ρ̂ state pass 2 used, and θ (P,)."""
    m = float(sums["rows"])
    grad = sums["grad"] / m + decay * theta
    if "S_W" in sums:  # one-pass: add the KL part now that g is known
        g1 = state.g[0]
        w1 = model.param("W1", torch.from_numpy(grad)).numpy()  # view into grad
        b1 = model.param("b1", torch.from_numpy(grad)).numpy()
        w1 += g1[:, None] * sums["S_W"] / m
        b1 += g1 * sums["S_b"] / m
    recon = float(sums["recon"]) / m
    # np.sum (pairwise, one thread), not np.dot: BLAS threads a long dot product and its last bit
    # then depends on the process's BLAS thread count (a Ray actor's differs from --local's).
    weight_decay = 0.5 * float(np.sum(decay * theta * theta))
    if obj.kind == "kl":
        sparsity = state.penalty
    elif obj.kind == "l1":
        sparsity = obj.l1 * float(sums["l1"]) / m
    else:
        sparsity = 0.0
    auxk = obj.auxk_coef * float(sums["auxk"]) / m if obj.auxk else 0.0
    # FVU = Σ‖x̂−x‖² / Σ‖x − x̄‖², with Σ‖x − x̄‖² = Σ‖x‖² − m‖x̄‖².
    total_var = float(sums["sum_x2"]) - float(np.sum(sums["sum_x"] * sums["sum_x"])) / m
    stats = {
        "fvu": 2.0 * float(sums["recon"]) / total_var if total_var > 0 else float("nan"),
        "clamped": state.clamped,
        "l0": [float(f.sum()) / m for f in split_layers(sums["fired"], model.hidden)],  # active units per row
        "dead": [int((f == 0).sum()) for f in split_layers(sums["fired"], model.hidden)],  # never active
    }
    terms = {"reconstruction": recon, "weight_decay": weight_decay, "sparsity": sparsity}
    if obj.auxk:
        terms["auxk"] = auxk
    return Evaluation(
        loss=sum(terms.values()),
        terms=terms,
        grad=grad,
        rows=int(m),
        layer_means=split_layers(sums["act"] / m, model.hidden),
        sparsity=state,
        stats=stats,
    )
