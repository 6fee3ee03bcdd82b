"""The hand-written forward/backward of the mirrored MLP: the fast path beside autograd's.

The same surrogate-loss gradient as autograd (checked to 1e-12 in float64 by the tests) without
building a graph, with every dW written by one matmul straight into one flat gradient buffer, and in
one-pass mode the layer-1 f′(z) of the backward reused for S_W (one stacked matmul gives ∇W1 and
S_W), and every (B, h) intermediate written into a reused Workspace. Pass 2 measured 1.36× faster than autograd on the notes' 64-25-64 model and 1.13× on
784-1024-784 (the benchmark suite). Shapes it does not cover (tied, top-k or unit-norm decoders,
AuxK, satlin) take autograd.
"""

from __future__ import annotations


import numpy as np
import torch

from dist_sae.sae.model import SparseAutoencoder
from dist_sae.sae.objective import Objective
from dist_sae.sae.sums import Sums, data_block_sums, layer_sums, to64


FAST_ACTIVATIONS = ("sigmoid", "tanh", "relu", "linear")
BACKWARDS = ("auto", "autograd", "handwritten")  # how pass 2 differentiates; auto: handwritten where supported


def use_handwritten(model: SparseAutoencoder, obj: Objective, backward: str = "auto") -> bool:
    """Whether pass 2 takes the hand-written path: `backward` is auto, autograd or handwritten.

    Raises:
        ValueError: backward=handwritten for a model the fast path does not cover, or an unknown name.
    """
    if backward not in BACKWARDS:
        raise ValueError(f"backward must be one of {BACKWARDS}, got {backward!r}")
    if backward == "autograd":
        return False
    supported = handwritten_supported(model, obj)
    if backward == "handwritten" and not supported:
        raise ValueError("backward=handwritten does not cover this model (tied, top-k, unit-norm decoder, AuxK or satlin)")
    return supported


class Workspace:
    """Scratch tensors, one per name, that a block's (B, h) intermediates are written into, block after block.

    A fresh (B, h) tensor per intermediate and block made RSS grow with the number of blocks under
    glibc's default allocator: they come from the heap (a thread's arena in a Ray worker) once the
    dynamic mmap threshold has risen past their size, and B varies (tapered units, shard ends), so
    the holes they leave between the small allocations that outlive a block (Ray's per-task
    records, returned sums) are not reused (measured: a Ray worker +150 MB at 64x the rows with its
    block buffers already pooled, all of it free memory). Here each is allocated once, at the
    largest rows seen (at least `rows`). Not thread-safe: one per PassRunner, whose blocks compute
    one at a time, and one per lane of train/lanes.py. Nothing a block returns may be a view of it.
    """

    def __init__(self, rows: int = 0) -> None:
        self.rows = rows
        self._bufs: dict[str, torch.Tensor] = {}
        self.made = 0  # buffers allocated so far: one per name, unless a block outgrows its buffer

    def get(self, name: str, rows: int, cols: int, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A (rows, cols) contiguous view of the buffer `name`, of `like`'s device and dtype (or `dtype`); contents undefined."""
        dtype = dtype or like.dtype
        buf = self._bufs.get(name)
        if buf is None or buf.shape[0] < rows or buf.shape[1] != cols or buf.dtype != dtype or buf.device != like.device:
            buf = self._bufs[name] = torch.empty((max(rows, self.rows), cols), dtype=dtype, device=like.device)
            self.made += 1
        return buf[:rows]


def scratch(ws: Workspace | None, name: str, rows: int, cols: int, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """ws.get(...), or a new tensor without a workspace."""
    if ws is None:
        return torch.empty((rows, cols), dtype=dtype or like.dtype, device=like.device)
    return ws.get(name, rows, cols, like, dtype)


def handwritten_supported(model: SparseAutoencoder, obj: Objective) -> bool:
    """True when handwritten_block can compute this model's pass 2 (else autograd does)."""
    return (
        not model.tied
        and not model.topk
        and not model.decoder_norm
        and not obj.auxk
        and obj.kind in ("kl", "l1", "none")
        and model.activation in FAST_ACTIVATIONS
        and model.output_activation in FAST_ACTIVATIONS
    )



def activate_(z: torch.Tensor, kind: str) -> torch.Tensor:
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



def _derivative_into(a: torch.Tensor, kind: str, ws: Workspace | None, name: str) -> torch.Tensor | None:
    """_derivative into the workspace buffer `name` (None for linear: f′ = 1, nothing to multiply)."""
    return None if kind == "linear" else _derivative(a, kind, out=scratch(ws, name, a.shape[0], a.shape[1], a))


@torch.no_grad()
def handwritten_block(model: SparseAutoencoder, obj: Objective, x: torch.Tensor, g: list[torch.Tensor] | None,
                      x_in: torch.Tensor | None = None, onepass: bool = False, data_sums: Sums | None = None,
                      ws: Workspace | None = None) -> Sums:
    """pass2_block (or, with onepass, onepass_block) for an untied mirrored MLP, without autograd.

    Same arguments and the same float64 sums as pass2_block; with onepass (g must be None) also
    S_W (h1, n) and S_b (h1,). data_sums: this block's `data_block_sums(x)` when the caller keeps
    them (they do not depend on θ), else they are computed here. ws: where the (B, h)
    intermediates go (None: new tensors).
    """
    inp = x if x_in is None else x_in  # (B, n)
    L, enc = model.num_layers, model.num_encoder
    B = inp.shape[0]
    theta = model.theta.detach()
    acts = [inp]  # h_0 = input, h_1 .. h_L
    for layer in range(1, L + 1):
        weight = model.param(f"W{layer}", theta)  # (fan_out, fan_in)
        z = torch.addmm(model.param(f"b{layer}", theta), acts[-1], weight.t(), out=scratch(ws, f"z{layer}", B, weight.shape[0], inp))
        acts.append(activate_(z, model.output_activation if layer == L else model.activation))
    diff = torch.sub(acts[-1], x, out=scratch(ws, "diff", B, x.shape[1], x))  # (B, n)
    flat = diff.reshape(-1)
    recon = 0.5 * torch.dot(flat, flat)
    fprime = _derivative_into(acts[-1], model.output_activation, ws, f"fprime{L}")
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
            extra["S_W"] = to64(both[delta.shape[1] :])
            extra["S_b"] = to64(sums_b[delta.shape[1] :])
            break
        torch.mm(delta.t(), h_prev, out=grad_w)  # (fan_out, fan_in)
        torch.sum(delta, 0, out=grad_b)
        if layer == 1:
            break
        below = layer - 1  # the activation h_below feeds this layer
        weight = model.param(f"W{layer}", theta)  # (fan_out, fan_in)
        dh = torch.mm(delta, weight, out=scratch(ws, f"dh{below}", B, weight.shape[1], delta))  # (B, fan_in)
        if below <= enc and below in penalised:
            if obj.kind == "kl" and g is not None:
                dh += g[penalised[below]]  # ∂(g·a)/∂a = g, the same for every row
            elif obj.kind == "l1":
                tmp = scratch(ws, f"l1_{below}", B, dh.shape[1], dh)  # |a|, then l1·sign(a)
                l1 = l1 + torch.abs(acts[below], out=tmp).sum()
                dh += torch.sign(acts[below], out=tmp).mul_(obj.l1)
        if below == 1 and onepass:
            stacked = scratch(ws, "stacked", B, 2 * dh.shape[1], dh)
            delta, fprime = stacked[:, : dh.shape[1]], stacked[:, dh.shape[1] :]
            _derivative(acts[below], model.activation, out=fprime)
            torch.mul(dh, fprime, out=delta)
            continue
        fprime = _derivative_into(acts[below], model.activation, ws, f"fprime{below}")
        delta = dh if fprime is None else dh.mul_(fprime)
    act, fired = layer_sums(acts[1 : enc + 1], model.activation, ws)
    sums = {
        "rows": np.array(float(x.shape[0])),
        "grad": to64(grad),  # a float64 view of the flat buffer (no copy in float64)
        "recon": np.array(float(recon.to(torch.float64))),
        "act": act,
        "fired": fired,
        "l1": np.array(float(l1.to(torch.float64))),
        "auxk": np.array(0.0),
        **(data_sums if data_sums is not None else data_block_sums(x)),
    }
    sums.update(extra)
    return sums
