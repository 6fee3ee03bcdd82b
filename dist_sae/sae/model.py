"""The sparse autoencoder: a mirrored MLP whose parameters live in one flat vector θ.

One flat parameter makes every consumer simple: L-BFGS steps one tensor, gradients reduce as one
float64 buffer, and θ travels to workers as one array. Named views give the layout of the notes
(the notes' layout): `W1` (hidden × visible), `b1`, `W2` (visible × hidden), `b2`, ... input to output.

This module imports only torch, safetensors and the config: it knows nothing of data or Ray.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from dist_sae.config import Config, from_dict
from dist_sae.errors import ModelError

log = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


class ParamSpec(NamedTuple):
    name: str  # "W1", "b1", ...
    shape: tuple[int, ...]
    offset: int  # start in θ
    layer: int  # 1-based layer number, input to output
    is_weight: bool


class Forward(NamedTuple):
    """Results of a forward pass on a block of B rows."""

    hidden: list[torch.Tensor]  # encoder activations a^(l), each (B, h_l), input side first
    output: torch.Tensor  # reconstruction x̂, (B, n)
    pre: list[torch.Tensor]  # encoder pre-activations z^(l) before top-k, each (B, h_l)


def layer_sizes(visible: int, hidden: list[int]) -> list[int]:
    """[n, h1, ..., hk, ..., h1, n]: the mirrored widths, input to output."""
    return [visible, *hidden, *reversed(hidden[:-1]), visible]


def activate(z: torch.Tensor, kind: str) -> torch.Tensor:
    if kind == "sigmoid":
        return torch.sigmoid(z)
    if kind == "tanh":
        return torch.tanh(z)
    if kind == "satlin":
        return z.clamp(0.0, 1.0)
    if kind == "relu":
        return torch.relu(z)
    if kind == "linear":
        return z
    raise ValueError(f"unknown activation {kind!r}")


def activation_derivative(a: torch.Tensor, z: torch.Tensor, kind: str) -> torch.Tensor:
    """f'(z), written with the activation a = f(z) where that is cheaper."""
    if kind == "sigmoid":
        return a * (1.0 - a)
    if kind == "tanh":
        return 1.0 - a * a
    if kind == "satlin":
        return ((z > 0) & (z < 1)).to(a.dtype)
    if kind == "relu":
        return (z > 0).to(a.dtype)
    if kind == "linear":
        return torch.ones_like(a)
    raise ValueError(f"unknown activation {kind!r}")


def keep_topk(z: torch.Tensor, k: int) -> torch.Tensor:
    """Zero all but the k largest entries of each row of z (B, h)."""
    top = torch.topk(z, k, dim=1)
    return torch.zeros_like(z).scatter(1, top.indices, top.values)


class SparseAutoencoder(torch.nn.Module):
    """Mirrored autoencoder n-h1-...-hk-...-h1-n with parameters in one flat vector `theta`.

    Args:
        visible: input dimension n.
        hidden: encoder widths, input side first.
        activation: hidden activation name.
        output: output activation name (sigmoid or linear).
        tied: decoder weights are transposes of the mirrored encoder weights.
        topk: {encoder layer (1-based): k} layers whose pre-activations keep only the k largest.
        decoder_norm: the output decoder's columns are used at unit norm (W / ‖W_col‖).
        dtype, device: of `theta`.
    """

    def __init__(
        self,
        visible: int,
        hidden: list[int],
        activation: str = "sigmoid",
        output: str = "sigmoid",
        tied: bool = False,
        topk: dict[int, int] | None = None,
        decoder_norm: bool = False,
        dtype: torch.dtype = torch.float64,
        device: str | torch.device = "cpu",
    ) -> None:
        super().__init__()
        self.visible, self.hidden = visible, list(hidden)
        self.activation, self.output_activation, self.tied = activation, output, tied
        self.topk = dict(topk or {})
        self.decoder_norm = decoder_norm
        self.sizes = layer_sizes(visible, self.hidden)
        self.num_layers = len(self.sizes) - 1  # weight matrices, input to output
        self.num_encoder = len(self.hidden)
        specs, offset = [], 0
        for layer in range(1, self.num_layers + 1):
            fan_in, fan_out = self.sizes[layer - 1], self.sizes[layer]
            if not (tied and layer > self.num_encoder):
                specs.append(ParamSpec(f"W{layer}", (fan_out, fan_in), offset, layer, True))
                offset += fan_out * fan_in
            specs.append(ParamSpec(f"b{layer}", (fan_out,), offset, layer, False))
            offset += fan_out
        self.specs: list[ParamSpec] = specs
        self._spec_by_name = {spec.name: spec for spec in specs}
        self.theta = torch.nn.Parameter(torch.zeros(offset, dtype=dtype, device=device))

    @classmethod
    def from_config(cls, cfg: Config, dtype: torch.dtype = torch.float64, device: str | torch.device = "cpu") -> SparseAutoencoder:
        m, sp = cfg.model, cfg.sparsity
        if m.visible is None:
            raise ModelError("model.visible is not set: give it, or train on a dataset so it is taken from the data")
        topk = {layer: sp.k for layer in sp.layers} if sp.kind == "topk" else None
        return cls(m.visible, m.hidden, m.activation, m.output, m.tied, topk, m.decoder_norm, dtype, device)

    @property
    def num_params(self) -> int:
        return self.theta.numel()

    def param(self, name: str, theta: torch.Tensor | None = None) -> torch.Tensor:
        """The named view of θ (or of another flat vector of the same layout, such as a gradient)."""
        flat = self.theta if theta is None else theta
        spec = self._spec_by_name[name]
        return flat[spec.offset : spec.offset + math.prod(spec.shape)].view(spec.shape)

    def weight(self, layer: int, theta: torch.Tensor | None = None) -> torch.Tensor:
        """W of a layer as used, (fan_out, fan_in): a tied decoder weight is the mirrored encoder weight
        transposed; with decoder_norm the output layer's columns are scaled to unit norm."""
        if self.tied and layer > self.num_encoder:
            w = self.param(f"W{self.num_layers + 1 - layer}", theta).t()
        else:
            w = self.param(f"W{layer}", theta)
        if self.decoder_norm and layer == self.num_layers:
            w = w / w.norm(dim=0, keepdim=True).clamp_min(1e-12)
        return w

    def reset_parameters(self, seed: int = 0) -> None:
        """The notes' initialisation: W ~ U(±sqrt(6 / (fan_in + fan_out + 1))), zero biases; seeded."""
        gen = torch.Generator().manual_seed(seed)
        values = torch.zeros(self.num_params, dtype=torch.float64)
        for spec in self.specs:
            if spec.is_weight:
                fan_out, fan_in = spec.shape
                r = math.sqrt(6.0 / (fan_in + fan_out + 1))
                n = fan_out * fan_in
                values[spec.offset : spec.offset + n] = (torch.rand(n, generator=gen, dtype=torch.float64) * 2 - 1) * r
        with torch.no_grad():
            self.theta.copy_(values)

    # ---- forward -------------------------------------------------------------------------

    def encode_layers(self, x: torch.Tensor, theta: torch.Tensor | None = None, upto: int | None = None) -> list[torch.Tensor]:
        """Encoder activations [a^(1), ..., a^(upto)] for x (B, n); each a^(l) is (B, h_l)."""
        return self._encode(x, theta, upto)[0]

    def _encode(self, x, theta, upto=None) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        acts, pres, h = [], [], x
        for layer in range(1, (upto or self.num_encoder) + 1):
            z = F.linear(h, self.weight(layer, theta), self.param(f"b{layer}", theta))
            pres.append(z)
            if layer in self.topk:
                z = keep_topk(z, self.topk[layer])
            h = activate(z, self.activation)
            acts.append(h)
        return acts, pres

    def decode(self, code, theta: torch.Tensor | None = None):
        """Reconstruction x̂ (B, n) from the innermost code (B, h_k); numpy in gives numpy out (no grad)."""
        if not isinstance(code, torch.Tensor):
            with torch.no_grad():
                return self.decode(self._as_tensor(code)[0], theta).cpu().numpy()
        h = code
        for layer in range(self.num_encoder + 1, self.num_layers + 1):
            z = F.linear(h, self.weight(layer, theta), self.param(f"b{layer}", theta))
            h = activate(z, self.output_activation if layer == self.num_layers else self.activation)
        return h

    def forward(self, x: torch.Tensor, theta: torch.Tensor | None = None) -> Forward:
        hidden, pre = self._encode(x, theta)
        return Forward(hidden, self.decode(hidden[-1], theta), pre)

    def _as_tensor(self, x) -> tuple[torch.Tensor, bool]:
        is_numpy = not isinstance(x, torch.Tensor)
        t = torch.as_tensor(x).to(device=self.theta.device, dtype=self.theta.dtype)
        return t, is_numpy

    @torch.no_grad()
    def encode(self, x, layer: int | None = None):
        """Hidden code of encoder `layer` (default: innermost) for numpy or torch input (B, n)."""
        t, is_numpy = self._as_tensor(x)
        code = self.encode_layers(t, upto=layer or self.num_encoder)[-1]
        return code.cpu().numpy() if is_numpy else code

    @torch.no_grad()
    def reconstruct(self, x):
        """x̂ for numpy or torch input (B, n)."""
        t, is_numpy = self._as_tensor(x)
        out = self.forward(t).output
        return out.cpu().numpy() if is_numpy else out

    # ---- named tensors -------------------------------------------------------------------

    def split(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """The free parameters' named views of a flat vector of θ's layout (e.g. a gradient), as stored."""
        return {spec.name: self.param(spec.name, flat) for spec in self.specs}

    def named_tensors(self, theta: torch.Tensor | None = None, materialize_tied: bool = True) -> dict[str, torch.Tensor]:
        """{"W1": ..., "b1": ..., ...} input to output; tied decoder weights are materialised copies."""
        out = {}
        for layer in range(1, self.num_layers + 1):
            if materialize_tied or not (self.tied and layer > self.num_encoder):
                out[f"W{layer}"] = self.weight(layer, theta).contiguous()
            out[f"b{layer}"] = self.param(f"b{layer}", theta)
        return out

    def load_named(self, tensors: dict[str, torch.Tensor], source: str = "weights") -> None:
        """Fill θ from named tensors, checking names and shapes."""
        values = torch.empty_like(self.theta)
        for spec in self.specs:
            if spec.name not in tensors:
                raise ModelError(f"{source} has no tensor {spec.name!r} (has {sorted(tensors)}); it does not fit this model")
            tensor = tensors[spec.name]
            if tuple(tensor.shape) != spec.shape:
                raise ModelError(
                    f"{source}: tensor {spec.name} has shape {tuple(tensor.shape)}, the model needs {spec.shape} "
                    f"(sizes {self.sizes})"
                )
            values[spec.offset : spec.offset + math.prod(spec.shape)] = tensor.reshape(-1).to(values.dtype)
        with torch.no_grad():
            self.theta.copy_(values)


def save_model(model: SparseAutoencoder, directory: str | Path, cfg: Config, theta: torch.Tensor | None = None) -> Path:
    """Write `model.safetensors` (W1, b1, ... input to output) and `config.json` into a directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.named_tensors(theta).items()}
    path = directory / MODEL_FILE
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata={"format": "dist_sae", "sizes": json.dumps(model.sizes)})
    tmp.replace(path)
    cfg.save(directory / CONFIG_FILE)
    return path


def load_model(path: str | Path, dtype: torch.dtype = torch.float64, device: str = "cpu",
               infer_architecture: bool = False) -> tuple[SparseAutoencoder, Config]:
    """Load a model from a run directory or a `.safetensors` file with `config.json` beside it.

    With infer_architecture, a file without config.json is read too: its tensors' shapes give
    the layer sizes (and tying); everything else is the default config (a warning says so).
    Only safetensors and JSON are read: nothing a user hands in is unpickled.
    """
    path = Path(path)
    weights = path / MODEL_FILE if path.is_dir() else path
    config_path = weights.parent / CONFIG_FILE
    if not weights.is_file():
        raise ModelError(f"no model at {weights}: expected a run directory or a {MODEL_FILE} file")
    if not config_path.is_file() and not infer_architecture:
        raise ModelError(f"{weights} has no {CONFIG_FILE} beside it; it is needed to know the architecture")
    try:
        tensors = load_file(str(weights))
        cfg = (from_dict(json.loads(config_path.read_text()), f" in {config_path}") if config_path.is_file()
               else _inferred_config(tensors, weights))
    except (json.JSONDecodeError, SafetensorError, OSError) as exc:
        raise ModelError(f"cannot read model {weights}: {exc}") from None
    if cfg.model.visible is None and "W1" in tensors:
        cfg.model.visible = tensors["W1"].shape[1]
    model = SparseAutoencoder.from_config(cfg, dtype, device)
    model.load_named(tensors, str(weights))
    return model, cfg


def _inferred_config(tensors: dict[str, torch.Tensor], source: Path) -> Config:
    """The default config with model.visible, model.hidden and model.tied read from W1, b1, ... shapes."""
    biases = sorted(int(k[1:]) for k in tensors if k[:1] == "b" and k[1:].isdigit())
    if "W1" not in tensors or not biases or biases != list(range(1, len(biases) + 1)) or len(biases) % 2:
        raise ModelError(f"{source}: has no {CONFIG_FILE} beside it, and its tensors {sorted(tensors)} are not "
                         "W1, b1, ... of a symmetric autoencoder: give the run directory")
    hidden = [int(tensors[f"b{k}"].shape[0]) for k in range(1, len(biases) // 2 + 1)]
    visible, tied = int(tensors["W1"].shape[1]), f"W{len(biases)}" not in tensors
    log.warning("%s has no %s beside it: model.visible=%d, model.hidden=%s, model.tied=%s were read from its tensors' "
                "shapes; activations and loss settings are the defaults (or the overrides given)",
                source, CONFIG_FILE, visible, hidden, str(tied).lower())
    return from_dict({"model": {"visible": visible, "hidden": hidden, "tied": tied}})


def load_weights_into(model: SparseAutoencoder, path: str | Path) -> None:
    """Initialise θ from a `.safetensors` file (the `--init` of train), checking names and shapes.

    A model file (W1, b1, ...) or a checkpoint's theta.safetensors (one flat `theta` of this model's size).
    """
    path = Path(path)
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise ModelError(f"cannot read initial weights {path}: {exc}") from None
    if set(tensors) == {"theta"} and tensors["theta"].numel() == model.num_params:  # a checkpoint's theta.safetensors
        with torch.no_grad():
            model.theta.copy_(tensors["theta"].reshape(-1).to(model.theta.dtype))
        return
    model.load_named(tensors, str(path))
