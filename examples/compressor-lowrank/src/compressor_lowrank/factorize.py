"""Truncated-SVD factorization of Linear layers, and rebuilding a factorized model from disk.

A Linear `W (out×in)` becomes `Sequential(Linear(in→r, no bias), Linear(r→out))` with
`W ≈ U_r·diag(s_r)·V_rᵀ`: the first holds `diag(√s_r)·V_rᵀ`, the second `U_r·diag(√s_r)` and the
bias. Both are plain torch modules, so training, ONNX export and quantization see ordinary MatMuls.
The ranks are recorded in config.json under `CONFIG_KEY`, which is how `load_factorized` knows
which modules to rebuild before reading the weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

CONFIG_KEY = "compressor_lowrank"


def rank_for(singular_values: Any, rank: int | None, energy: float | None) -> int:
    """The rank kept: `rank` itself, or the smallest one keeping `energy` of Σs² (never above the full rank)."""
    import torch

    full = int(singular_values.numel())
    if rank is not None:
        return min(rank, full)
    share = torch.cumsum(singular_values.double() ** 2, 0) / (singular_values.double() ** 2).sum()
    return min(full, int(torch.searchsorted(share, torch.tensor(float(energy), dtype=torch.float64))) + 1)


def saves_parameters(in_features: int, out_features: int, rank: int) -> bool:
    """Whether two factors of this rank hold fewer weights than the full matrix."""
    return rank * (in_features + out_features) < in_features * out_features


def factorize_linear(linear: Any, rank: int) -> Any:
    """Two Linears whose product is the best rank-`rank` approximation of `linear` (Eckart–Young)."""
    import torch

    weight = linear.weight.detach().double()
    u, s, vh = torch.linalg.svd(weight, full_matrices=False)
    root = s[:rank].sqrt()
    down = torch.nn.Linear(linear.in_features, rank, bias=False)
    up = torch.nn.Linear(rank, linear.out_features, bias=linear.bias is not None)
    with torch.no_grad():
        down.weight.copy_((root[:, None] * vh[:rank]).to(linear.weight.dtype))
        up.weight.copy_((u[:, :rank] * root[None, :]).to(linear.weight.dtype))
        if linear.bias is not None:
            up.bias.copy_(linear.bias.detach())
    return torch.nn.Sequential(down, up)


def replace_module(model: Any, name: str, module: Any) -> None:
    """Set the submodule at dotted path `name`."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def rebuild_empty(model: Any, ranks: dict[str, int]) -> None:
    """Give `model` the factorized shapes recorded in `ranks` (weights are loaded afterwards)."""
    import torch

    for name, rank in ranks.items():
        linear = model.get_submodule(name)
        down = torch.nn.Linear(linear.in_features, rank, bias=False)
        up = torch.nn.Linear(rank, linear.out_features, bias=linear.bias is not None)
        replace_module(model, name, torch.nn.Sequential(down, up))


def load_factorized(path: Path, task: str, config: dict[str, Any]) -> Any:
    """Rebuild a model saved by `lowrank`: the architecture from config.json, the factors, then the weights."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoModelForTokenClassification

    cls = AutoModelForSequenceClassification if task == "text-classification" else AutoModelForTokenClassification
    model = cls.from_config(AutoConfig.from_pretrained(str(path)))
    rebuild_empty(model, config[CONFIG_KEY]["ranks"])
    state: dict[str, Any] = {}
    for shard in sorted(Path(path).glob("*.safetensors")):
        state.update(load_file(str(shard)))
    model.load_state_dict(state, strict=True)
    return model.eval()
