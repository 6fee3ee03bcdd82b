"""An independent NumPy implementation of J_sparse and its gradient, written from the notes.

It uses the notes' backpropagation (δ^(l) with the β KL′ term added per row inside δ of the
penalised layers), not the surrogate-loss trick the package uses, so the two check each other.
"""

from __future__ import annotations

import numpy as np


def _act(z, kind):
    if kind == "sigmoid":
        return 1.0 / (1.0 + np.exp(-z))
    if kind == "tanh":
        return np.tanh(z)
    if kind == "linear":
        return z
    if kind == "relu":
        return np.maximum(z, 0.0)
    raise ValueError(kind)


def _dact(a, z, kind):
    if kind == "sigmoid":
        return a * (1 - a)
    if kind == "tanh":
        return 1 - a * a
    if kind == "linear":
        return np.ones_like(a)
    if kind == "relu":
        return (z > 0).astype(a.dtype)
    raise ValueError(kind)


def sparse_ae_cost(weights, biases, X, activation="sigmoid", output="sigmoid", kl=None, lam=1e-4, l1=None):
    """J and (dW, db) for a mirrored autoencoder.

    Args:
        weights, biases: lists W_l (out, in) and b_l (out,), input to output.
        X: (m, n) float64.
        kl: {encoder layer (1-based): (rho, beta)} KL penalties.
        lam: weight decay λ on every W.
        l1: {encoder layer: λ1} L1 penalties λ1 · mean_i Σ_j |a_ij|.
    """
    kl, l1 = kl or {}, l1 or {}
    m = X.shape[0]
    L = len(weights)
    acts, zs = [X], []
    for l in range(L):
        z = acts[-1] @ weights[l].T + biases[l]
        a = _act(z, output if l == L - 1 else activation)
        zs.append(z)
        acts.append(a)
    J = 0.5 * np.sum((acts[-1] - X) ** 2) / m + 0.5 * lam * sum(np.sum(W * W) for W in weights)
    tanh = activation == "tanh"
    kl_grad = {}
    for layer, (rho, beta) in kl.items():
        mean = acts[layer].mean(axis=0)
        q = (1 + mean) / 2 if tanh else mean
        J += beta * np.sum(rho * np.log(rho / q) + (1 - rho) * np.log((1 - rho) / (1 - q)))
        kl_grad[layer] = beta * (-rho / q + (1 - rho) / (1 - q)) * (0.5 if tanh else 1.0)
    for layer, lam1 in l1.items():
        J += lam1 * np.abs(acts[layer]).sum() / m
    dWs, dbs = [None] * L, [None] * L
    delta = (acts[-1] - X) * _dact(acts[-1], zs[-1], output)
    for l in range(L - 1, -1, -1):
        dWs[l] = delta.T @ acts[l] / m + lam * weights[l]
        dbs[l] = delta.sum(axis=0) / m
        if l == 0:
            break
        back = delta @ weights[l]  # (m, size of layer l)
        if l in kl_grad:
            back = back + kl_grad[l]  # the notes' per-row sparsity term
        if l in l1:
            back = back + l1[l] * np.sign(acts[l])
        delta = back * _dact(acts[l], zs[l - 1], activation)
    return J, dWs, dbs
