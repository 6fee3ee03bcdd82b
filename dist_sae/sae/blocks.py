"""Per-block partial sums of the exact objective (docs/maths.md: pass 1, pass 2, one pass).

Each function takes one block of rows x (B, n) in the compute dtype and returns float64 sums;
whoever streams the blocks adds them in work-unit order (sums.OrderedReducer) and calls
objective.finalize.
"""

from __future__ import annotations


import numpy as np
import torch

from dist_sae.sae.model import SparseAutoencoder, activation_derivative, keep_topk, activate
from dist_sae.sae.backward import FAST_ACTIVATIONS, Workspace, activate_, handwritten_block, scratch, use_handwritten
from dist_sae.sae.objective import Objective
from dist_sae.sae.sums import Sums, data_block_sums, layer_sums, to64


@torch.no_grad()
def pass1_block(model: SparseAutoencoder, x: torch.Tensor, ws: Workspace | None = None) -> Sums:
    """Pass 1 on a block x (B, n): Σ_i a^(l)_i and active counts for every encoder layer, (Σ h_l,) each.

    ws: where the (B, h) activations go on the fast path (None: new tensors; see backward.Workspace).
    """
    if model.activation in FAST_ACTIVATIONS and not model.topk and not model.tied:
        acts, h, theta = [], x, model.theta.detach()
        for layer in range(1, model.num_encoder + 1):  # addmm and an in-place f: no extra (B, h) tensors
            weight = model.param(f"W{layer}", theta)  # (h_l, h_{l-1})
            z = scratch(ws, f"z{layer}", x.shape[0], weight.shape[0], x)
            h = activate_(torch.addmm(model.param(f"b{layer}", theta), h, weight.t(), out=z), model.activation)
            acts.append(h)
    else:
        acts = model.encode_layers(x)
    act, fired = layer_sums(acts, model.activation, ws)
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
    backward: str = "auto",
    ws: Workspace | None = None,
) -> Sums:
    """Pass 2 on a block: the surrogate-loss gradient of docs/maths.md §2 and the loss sums.

    Args:
        x: target rows (B, n) in the compute dtype.
        g: per penalised layer, the constant KL′ vector (h_l,) in the compute dtype; None without KL.
        x_in: the encoder's input when it differs from the target (denoising); default x.
        dead: AuxK dead-unit mask (h1,) bool, or None.
        data_sums: the block's data_block_sums(x) when the caller keeps them; else computed here.
        backward: auto (hand-written where it covers the model), autograd, or handwritten.
        ws: scratch tensors for the hand-written path's intermediates (backward.Workspace; None: new ones).

    Returns float64 sums: grad (P,), recon Σ½‖x̂−x‖², act and fired (Σ h_l,), sum_x (n,), sum_x2,
    l1, auxk, rows.
    """
    if use_handwritten(model, obj, backward):
        return handwritten_block(model, obj, x, g, x_in, data_sums=data_sums, ws=ws)
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
    act, fired = layer_sums(fwd.hidden, model.activation)
    return {
        "rows": np.array(float(x.shape[0])),
        "grad": to64(grad),
        "recon": np.array(float(recon.detach().to(torch.float64))),
        "act": act,
        "fired": fired,
        "l1": np.array(float(l1.detach().to(torch.float64))),
        "auxk": np.array(float(aux.detach().to(torch.float64))),
        **(data_sums if data_sums is not None else data_block_sums(x)),
    }


def onepass_block(
    model: SparseAutoencoder,
    obj: Objective,
    x: torch.Tensor,
    x_in: torch.Tensor | None = None,
    data_sums: Sums | None = None,
    backward: str = "auto",
    ws: Workspace | None = None,
) -> Sums:
    """One-pass exact gradient (docs/maths.md §3) for KL on encoder layer 1: pass-2 sums with g = 0, plus

    S_W = Σ_i f′(z_i) x_iᵀ (h1, n) and S_b = Σ_i f′(z_i) (h1,), so that afterwards
    ∇W1 += g ⊙ S_W / m and ∇b1 += g ⊙ S_b / m once ρ̂ (hence g) is known.
    """
    if use_handwritten(model, obj, backward):  # reuses the backward's f′(z1): no second forward
        return handwritten_block(model, obj, x, None, x_in, onepass=True, data_sums=data_sums, ws=ws)
    sums = pass2_block(model, obj, x, None, x_in, data_sums=data_sums, backward="autograd")
    inp = x if x_in is None else x_in
    with torch.no_grad():
        z1 = torch.nn.functional.linear(inp, model.weight(1), model.param("b1"))
        a1 = model.encode_layers(inp, upto=1)[0]
        fprime = activation_derivative(a1, z1, model.activation)  # (B, h1)
        sums["S_W"] = to64(fprime.t() @ inp)  # (h1, n)
        sums["S_b"] = to64(fprime.sum(0))
    return sums
