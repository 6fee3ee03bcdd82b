"""The exact sparse-autoencoder objective (SPEC §1–2), as per-block partial sums.

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

from .config import Config
from .model import SparseAutoencoder, activation_derivative, keep_topk, activate

Sums = dict[str, np.ndarray]  # named float64 partial sums of one or more blocks; "rows" counts rows


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


# ---- per-block sums ------------------------------------------------------------------------


def _to64(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(device="cpu", dtype=torch.float64).numpy()


def active(a: torch.Tensor, activation: str) -> torch.Tensor:
    """Which units count as active (for L0 and dead units): sigmoid a > ½, tanh a > 0, else a ≠ 0."""
    if activation == "sigmoid":
        return a > 0.5
    if activation == "tanh":
        return a > 0
    return a != 0


def _layer_sums(acts: list[torch.Tensor], activation: str) -> tuple[np.ndarray, np.ndarray]:
    """(Σ_i a_i, Σ_i [a_i active]) of every encoder layer, concatenated (Σ h_l,), float64."""
    sums = torch.cat([a.detach().sum(0, dtype=torch.float64) for a in acts])
    fired = torch.cat([active(a.detach(), activation).sum(0).to(torch.float64) for a in acts])  # integer counts
    return _to64(sums), _to64(fired)


@torch.no_grad()
def pass1_block(model: SparseAutoencoder, x: torch.Tensor) -> Sums:
    """Pass 1 on a block x (B, n): Σ_i a^(l)_i and active counts for every encoder layer, (Σ h_l,) each."""
    if model.activation in FAST_ACTIVATIONS and not model.topk and not model.tied:
        acts, h, theta = [], x, model.theta.detach()
        for layer in range(1, model.num_encoder + 1):  # addmm and an in-place f: no extra (B, h) tensors
            h = _activate_(torch.addmm(model.param(f"b{layer}", theta), h, model.param(f"W{layer}", theta).t()), model.activation)
            acts.append(h)
    else:
        acts = model.encode_layers(x)
    act, fired = _layer_sums(acts, model.activation)
    return {"rows": np.array(float(x.shape[0])), "act": act, "fired": fired}


def auxk_residual_loss(model: SparseAutoencoder, obj: Objective, fwd, x: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
    """AuxK (Gao et al. 2024): the k_aux largest pre-activations among dead units reconstruct the
    residual e = x − x̂ through the decoder (no bias); returns Σ_rows ½‖e − ê‖².

    dead: (h1,) bool. One hidden layer, linear output (checked by the config).
    """
    k = min(obj.auxk, int(dead.sum()))
    if k == 0:
        return torch.zeros((), dtype=x.dtype, device=x.device)
    z = fwd.pre[0].masked_fill(~dead, float("-inf"))  # (B, h1): only dead units compete
    code = activate(keep_topk(z, k), model.activation)  # (B, h1), k_aux nonzeros per row
    residual = (x - fwd.output).detach()  # (B, n)
    e_hat = code @ model.weight(model.num_layers).t()  # (B, n)
    return 0.5 * ((residual - e_hat) ** 2).sum()


def pass2_block(
    model: SparseAutoencoder,
    obj: Objective,
    x: torch.Tensor,
    g: list[torch.Tensor] | None,
    x_in: torch.Tensor | None = None,
    dead: torch.Tensor | None = None,
    data_sums: Sums | None = None,
) -> Sums:
    """Pass 2 on a block: the surrogate-loss gradient of SPEC §2 and the loss sums.

    Args:
        x: target rows (B, n) in the compute dtype.
        g: per penalised layer, the constant KL′ vector (h_l,) in the compute dtype; None without KL.
        x_in: the encoder's input when it differs from the target (denoising); default x.
        dead: AuxK dead-unit mask (h1,) bool, or None.
        data_sums: the block's data_block_sums(x) when the caller keeps them; else computed here.

    Returns float64 sums: grad (P,), recon Σ½‖x̂−x‖², act and fired (Σ h_l,), sum_x (n,), sum_x2,
    l1, auxk, rows.
    """
    if handwritten_supported(model, obj):
        return handwritten_block(model, obj, x, g, x_in, data_sums=data_sums)
    fwd = model(x if x_in is None else x_in)
    diff = fwd.output - x  # (B, n)
    recon = 0.5 * (diff * diff).sum()
    surrogate = recon
    l1 = torch.zeros((), dtype=x.dtype, device=x.device)
    if obj.kind == "kl" and g is not None:
        for layer, g_layer in zip(obj.layers, g):
            surrogate = surrogate + (fwd.hidden[layer - 1] * g_layer).sum()  # g·a_i, summed over rows
    elif obj.kind == "l1":
        for layer in obj.layers:
            l1 = l1 + fwd.hidden[layer - 1].abs().sum()
        surrogate = surrogate + obj.l1 * l1
    aux = torch.zeros((), dtype=x.dtype, device=x.device)
    if obj.auxk and dead is not None:
        aux = auxk_residual_loss(model, obj, fwd, x, dead)
        surrogate = surrogate + obj.auxk_coef * aux
    (grad,) = torch.autograd.grad(surrogate, model.theta)
    act, fired = _layer_sums(fwd.hidden, model.activation)
    return {
        "rows": np.array(float(x.shape[0])),
        "grad": _to64(grad),
        "recon": np.array(float(recon.detach().to(torch.float64))),
        "act": act,
        "fired": fired,
        "l1": np.array(float(l1.detach().to(torch.float64))),
        "auxk": np.array(float(aux.detach().to(torch.float64))),
        **(data_sums if data_sums is not None else data_block_sums(x)),
    }


def onepass_block(
    model: SparseAutoencoder, obj: Objective, x: torch.Tensor, x_in: torch.Tensor | None = None, data_sums: Sums | None = None
) -> Sums:
    """One-pass exact gradient (SPEC §2) for KL on encoder layer 1: pass-2 sums with g = 0, plus

    S_W = Σ_i f′(z_i) x_iᵀ (h1, n) and S_b = Σ_i f′(z_i) (h1,), so that afterwards
    ∇W1 += g ⊙ S_W / m and ∇b1 += g ⊙ S_b / m once ρ̂ (hence g) is known.
    """
    if handwritten_supported(model, obj):  # reuses the backward's f′(z1): no second forward
        return handwritten_block(model, obj, x, None, x_in, onepass=True, data_sums=data_sums)
    sums = pass2_block(model, obj, x, None, x_in, data_sums=data_sums)
    inp = x if x_in is None else x_in
    with torch.no_grad():
        z1 = torch.nn.functional.linear(inp, model.weight(1), model.param("b1"))
        a1 = model.encode_layers(inp, upto=1)[0]
        fprime = activation_derivative(a1, z1, model.activation)  # (B, h1)
        sums["S_W"] = _to64(fprime.t() @ inp)  # (h1, n)
        sums["S_b"] = _to64(fprime.sum(0))
    return sums


# ---- hand-written forward/backward ------------------------------------------------------------
#
# The mirrored MLP's backward written out: the same surrogate-loss gradient as autograd (checked to
# 1e-12 in float64 by tests/test_perf_paths.py) without building a graph, with every dW written by
# one matmul straight into one flat gradient buffer, and in one-pass mode the layer-1 f′(z) of the
# backward reused for S_W (one stacked matmul gives ∇W1 and S_W). Pass 2 measured 1.36× faster
# than autograd on the notes' 64-25-64 model and 1.13× on 784-1024-784 (scripts/bench.py). Shapes
# the fast path does not cover (tied or top-k or unit-norm decoders, AuxK, satlin) take autograd.

FAST_ACTIVATIONS = ("sigmoid", "tanh", "relu", "linear")
USE_HANDWRITTEN = True  # False forces the autograd path everywhere (benchmarks, debugging)


def handwritten_supported(model: SparseAutoencoder, obj: Objective) -> bool:
    """True when handwritten_block computes this model's pass 2 (else autograd does)."""
    return (
        USE_HANDWRITTEN
        and not model.tied
        and not model.topk
        and not model.decoder_norm
        and not obj.auxk
        and obj.kind in ("kl", "l1", "none")
        and model.activation in FAST_ACTIVATIONS
        and model.output_activation in FAST_ACTIVATIONS
    )


def _activate_(z: torch.Tensor, kind: str) -> torch.Tensor:
    """f(z), in place on z (a fresh matmul result nobody else holds)."""
    if kind == "sigmoid":
        return z.sigmoid_()
    if kind == "tanh":
        return z.tanh_()
    if kind == "relu":
        return z.relu_()
    return z


def _derivative(a: torch.Tensor, kind: str, out: torch.Tensor | None = None) -> torch.Tensor | None:
    """f′(z) from a = f(z), (B, h), into `out` when given; None for linear (f′ = 1) without `out`."""
    if kind == "sigmoid":
        return torch.addcmul(a, a, a, value=-1.0, out=out)  # a − a², one pass over a
    if kind == "tanh":
        return torch.addcmul(torch.ones((), dtype=a.dtype, device=a.device), a, a, value=-1.0, out=out)
    if kind == "relu":  # autograd's relu backward passes the gradient where z > 0
        return torch.gt(a, 0).to(a.dtype) if out is None else out.copy_(a > 0)
    return None if out is None else out.fill_(1.0)


@torch.no_grad()
def handwritten_block(
    model: SparseAutoencoder,
    obj: Objective,
    x: torch.Tensor,
    g: list[torch.Tensor] | None,
    x_in: torch.Tensor | None = None,
    onepass: bool = False,
    data_sums: Sums | None = None,
) -> Sums:
    """pass2_block (or, with onepass, onepass_block) for an untied mirrored MLP, without autograd.

    Same arguments and the same float64 sums as pass2_block; with onepass (g must be None) also
    S_W (h1, n) and S_b (h1,). data_sums: this block's `data_block_sums(x)` when the caller keeps
    them (they do not depend on θ), else they are computed here.
    """
    inp = x if x_in is None else x_in  # (B, n)
    L, enc = model.num_layers, model.num_encoder
    theta = model.theta.detach()
    acts = [inp]  # h_0 = input, h_1 .. h_L
    for layer in range(1, L + 1):
        z = torch.addmm(model.param(f"b{layer}", theta), acts[-1], model.param(f"W{layer}", theta).t())  # (B, fan_out)
        acts.append(_activate_(z, model.output_activation if layer == L else model.activation))
    diff = acts[-1] - x  # (B, n)
    flat = diff.reshape(-1)
    recon = 0.5 * torch.dot(flat, flat)
    fprime = _derivative(acts[-1], model.output_activation)
    delta = diff if fprime is None else diff.mul_(fprime)  # ∂surrogate/∂z_L (B, n)
    grad = torch.empty_like(theta)  # (P,) one flat buffer, filled view by view
    penalised = {layer: i for i, layer in enumerate(obj.layers)}
    l1 = torch.zeros((), dtype=x.dtype, device=x.device)
    extra: Sums = {}
    stacked: torch.Tensor | None = None  # one-pass: [δ1 | f′(z1)] (B, 2 h1), made at layer 2, used at layer 1
    for layer in range(L, 0, -1):
        h_prev = acts[layer - 1]
        grad_w, grad_b = model.param(f"W{layer}", grad), model.param(f"b{layer}", grad)
        if layer == 1 and onepass:
            # stacked = [δ1 | f′(z1)] (B, 2 h1), filled below: one matmul gives ∇W1 and S_W, one sum ∇b1 and S_b.
            both = stacked.t() @ h_prev  # (2 h1, n)
            grad_w.copy_(both[: delta.shape[1]])
            sums_b = stacked.sum(0)
            grad_b.copy_(sums_b[: delta.shape[1]])
            extra["S_W"] = _to64(both[delta.shape[1] :])
            extra["S_b"] = _to64(sums_b[delta.shape[1] :])
            break
        torch.mm(delta.t(), h_prev, out=grad_w)  # (fan_out, fan_in)
        torch.sum(delta, 0, out=grad_b)
        if layer == 1:
            break
        below = layer - 1  # the activation h_below feeds this layer
        dh = delta @ model.param(f"W{layer}", theta)  # (B, fan_in)
        if below <= enc and below in penalised:
            if obj.kind == "kl" and g is not None:
                dh += g[penalised[below]]  # ∂(g·a)/∂a = g, the same for every row
            elif obj.kind == "l1":
                l1 = l1 + acts[below].abs().sum()
                dh += obj.l1 * acts[below].sign()
        if below == 1 and onepass:
            stacked = torch.empty(dh.shape[0], 2 * dh.shape[1], dtype=dh.dtype, device=dh.device)
            delta, fprime = stacked[:, : dh.shape[1]], stacked[:, dh.shape[1] :]
            _derivative(acts[below], model.activation, out=fprime)
            torch.mul(dh, fprime, out=delta)
            continue
        fprime = _derivative(acts[below], model.activation)
        delta = dh if fprime is None else dh.mul_(fprime)
    act, fired = _layer_sums(acts[1 : enc + 1], model.activation)
    sums = {
        "rows": np.array(float(x.shape[0])),
        "grad": _to64(grad),  # a float64 view of the flat buffer (no copy in float64)
        "recon": np.array(float(recon.to(torch.float64))),
        "act": act,
        "fired": fired,
        "l1": np.array(float(l1.to(torch.float64))),
        "auxk": np.array(0.0),
        **(data_sums if data_sums is not None else data_block_sums(x)),
    }
    sums.update(extra)
    return sums


def data_block_sums(x: torch.Tensor) -> Sums:
    """Σ_i x_i (n,) and Σ_i ‖x_i‖² of a block, float64: for the FVU; they do not depend on θ."""
    x64 = x.to(torch.float64).reshape(-1)
    return {"sum_x": _to64(x.sum(0, dtype=torch.float64)), "sum_x2": np.array(float(torch.dot(x64, x64)))}


# ---- reduction -----------------------------------------------------------------------------


def add_sums(total: Sums | None, part: Sums) -> Sums:
    """total + part, key by key, in float64 (total is updated in place when given)."""
    if total is None:
        return {k: np.array(v, dtype=np.float64, copy=True) for k, v in part.items()}
    for k, v in part.items():
        total[k] += v
    return total


class OrderedReducer:
    """Adds per-unit sums in unit-id order, whatever order they arrive in.

    Results that arrive early wait in a buffer until every lower unit id has been added, so the
    float64 result is bit-identical however many workers there are and whoever ran which unit.
    """

    def __init__(self, unit_ids: list[int]) -> None:
        self._order = sorted(unit_ids)
        self._next = 0
        self._pending: dict[int, Sums] = {}
        self.total: Sums | None = None

    def add(self, unit_id: int, sums: Sums) -> None:
        if unit_id in self._pending or unit_id in self._order[: self._next]:
            raise RuntimeError(f"work unit {unit_id} reduced twice")
        self._pending[unit_id] = sums
        while self._next < len(self._order) and self._order[self._next] in self._pending:
            self.total = add_sums(self.total, self._pending.pop(self._order[self._next]))
            self._next += 1

    @property
    def done(self) -> bool:
        return self._next == len(self._order)


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
    weight_decay = 0.5 * float(np.dot(decay * theta, theta))
    if obj.kind == "kl":
        sparsity = state.penalty
    elif obj.kind == "l1":
        sparsity = obj.l1 * float(sums["l1"]) / m
    else:
        sparsity = 0.0
    auxk = obj.auxk_coef * float(sums["auxk"]) / m if obj.auxk else 0.0
    # FVU = Σ‖x̂−x‖² / Σ‖x − x̄‖², with Σ‖x − x̄‖² = Σ‖x‖² − m‖x̄‖².
    total_var = float(sums["sum_x2"]) - float(np.dot(sums["sum_x"], sums["sum_x"])) / m
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
