"""The DINO projection head: MLP, L2 normalization, weight-normalized prototypes layer."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

# torch.nn.utils.weight_norm (the release) names the two tensors weight_g / weight_v;
# torch.nn.utils.parametrizations.weight_norm (torch >= 2.1) names the same tensors these.
_PARAMETRIZATION_NAMES = {
    "weight_g": "parametrizations.weight.original0",
    "weight_v": "parametrizations.weight.original1",
}
WEIGHT_NORM_KEY_STYLES = ("release", "parametrization")


def convert_weight_norm_keys(state_dict: dict, style: str = "release") -> dict:
    """Rename weight-norm entries of a state dict to one key style; other entries are kept.

    style="release": ``<layer>.weight_g`` / ``<layer>.weight_v``, the keys of the public DINO
    checkpoints, ``torch.nn.utils.weight_norm`` and ``DINOHead``. style="parametrization":
    ``<layer>.parametrizations.weight.original0`` / ``original1``, the keys of
    ``torch.nn.utils.parametrizations.weight_norm``. Returns a new dict in the same order.
    """
    if style not in WEIGHT_NORM_KEY_STYLES:
        raise ValueError(f"style={style!r}: choose one of {WEIGHT_NORM_KEY_STYLES}")
    renames = (_PARAMETRIZATION_NAMES if style == "parametrization"
               else {new: old for old, new in _PARAMETRIZATION_NAMES.items()})
    converted = {}
    for key, value in state_dict.items():
        for old_suffix, new_suffix in renames.items():
            if key == old_suffix or key.endswith("." + old_suffix):
                key = key[: len(key) - len(old_suffix)] + new_suffix
                break
        converted[key] = value
    return converted


class WeightNormalizedLinear(nn.Module):
    """Bias-free linear layer y = x W^T with W = g * v / ||v||, the norm taken per output row.

    The function and the state-dict keys (``weight_g`` (out, 1), ``weight_v`` (out, in)) of the
    release's ``torch.nn.utils.weight_norm(nn.Linear(in, out, bias=False))``. It also loads the
    keys of ``torch.nn.utils.parametrizations.weight_norm`` (``parametrizations.weight.original0``
    and ``original1``). Input (..., in_features) -> output (..., out_features).
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight_v = nn.Parameter(torch.empty(out_features, in_features))
        # nn.Linear's default init for the direction; the release then sets the magnitude to 1.
        nn.init.kaiming_uniform_(self.weight_v, a=math.sqrt(5))
        self.weight_g = nn.Parameter(torch.ones(out_features, 1))
        self.register_load_state_dict_pre_hook(_accept_parametrization_keys)

    @property
    def weight(self) -> torch.Tensor:
        # The very function both torch weight-norm implementations call (fused on CPU and CUDA).
        return torch._weight_norm(self.weight_v, self.weight_g, 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


def _accept_parametrization_keys(module, state_dict, prefix, *_):
    for name, parametrization_name in _PARAMETRIZATION_NAMES.items():
        if prefix + parametrization_name in state_dict:
            state_dict[prefix + name] = state_dict.pop(prefix + parametrization_name)


class DINOHead(nn.Module):
    """MLP -> L2 normalization -> weight-normalized linear layer to ``out_dim`` prototypes.

    The release's arguments, in its order (``DINOHead(embed_dim, out_dim, use_bn_in_head)`` as in
    its ``main_dino.py``). Features (N, in_dim) -> logits (N, out_dim). The MLP is in_dim ->
    hidden_dim (x nlayers - 1) -> bottleneck_dim with GELU between layers; with nlayers=1 it is a
    single linear layer.
    use_bn=True puts a BatchNorm1d after each hidden linear layer, as the release's
    ``--use_bn_in_head`` (off by default there): the batch statistics remove the component
    all images share, which matters when the backbone's features barely differ across images
    (a randomly initialized ViT on a small dataset). Keys as in the release: ``mlp.0``, ``mlp.2``,
    ``mlp.4`` for 3 layers without batch norm (``mlp.0``, ``mlp.1``, ``mlp.3``, ``mlp.4``,
    ``mlp.6`` with it), ``last_layer.weight_g``, ``last_layer.weight_v``.

    norm_last_layer=True fixes the last layer's magnitude g to 1 and freezes it (requires_grad
    False), so only the prototype directions are learned; the release recommends it for stability.
    """

    def __init__(self, in_dim: int, out_dim: int = 65536, use_bn: bool = False,
                 norm_last_layer: bool = True, nlayers: int = 3, hidden_dim: int = 2048,
                 bottleneck_dim: int = 256):
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"nlayers={nlayers}: the head needs at least one layer")
        if nlayers == 1:
            self.mlp = nn.Linear(in_dim, bottleneck_dim)
        else:
            layers = []
            for layer_in in [in_dim] + [hidden_dim] * (nlayers - 2):
                layers.append(nn.Linear(layer_in, hidden_dim))
                if use_bn:
                    layers.append(nn.BatchNorm1d(hidden_dim))
                layers.append(nn.GELU())
            layers.append(nn.Linear(hidden_dim, bottleneck_dim))
            self.mlp = nn.Sequential(*layers)
        for module in self.mlp.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        self.last_layer = WeightNormalizedLinear(bottleneck_dim, out_dim)
        self.last_layer.weight_g.requires_grad_(not norm_last_layer)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """(N, in_dim) -> (N, out_dim)."""
        bottleneck = F.normalize(self.mlp(features), dim=-1, p=2)
        return self.last_layer(bottleneck)
