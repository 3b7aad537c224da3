"""LoRA: a low-rank update beside a frozen linear layer, y = W x + s * B A dropout(x), s = alpha / r.

A starts Kaiming-uniform and B at zero, so a freshly wrapped model computes exactly what the base did.
DoRA (variant dora, Liu et al. 2024) also trains a magnitude m per output row: the layer's weight becomes
m * (W + s B A) / ||W + s B A|| (the norm of each row, treated as a constant in the backward pass, as the paper
and PEFT do); m starts as W's row norms, so it too starts as the base.
`apply_lora` swaps targeted `nn.Linear`s for `LoRALinear`s that share (never copy) the base tensors, so
state-dict names of the base weights do not change and the adapter is just the `lora_A`/`lora_B` tensors.
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from lit_lora.errors import UserError
from lit_lora.quantize import dequantized, linear

# Target name -> attribute name of the linear layer (in Block.self_attn, Block.mlp, or the model for "head").
TARGETS = {
    "query": "q_proj",
    "key": "k_proj",
    "value": "v_proj",
    "output": "o_proj",
    "gate": "gate_proj",
    "up": "up_proj",
    "down": "down_proj",
    "head": "lm_head",
}
TARGET_GROUPS = {"attention": ["query", "key", "value", "output"], "mlp": ["gate", "up", "down"]}
VARIANTS = ("lora", "dora")


@dataclass
class LoRAConfig:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: list[str] = field(default_factory=lambda: ["query", "value"])
    use_rslora: bool = False  # scale by alpha / sqrt(r) instead of alpha / r
    variant: str = "lora"  # or dora: a trained magnitude per output row besides the low-rank direction update

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise UserError(f"lora.variant {self.variant!r} is not one of {', '.join(VARIANTS)}")
        if self.r < 1:
            raise UserError(f"LoRA rank r must be >= 1, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        expanded: list[str] = []
        for t in self.targets:
            for name in TARGET_GROUPS.get(t, [t]):
                if name not in TARGETS:
                    valid = ", ".join([*TARGETS, *TARGET_GROUPS])
                    raise UserError(f"unknown LoRA target {t!r}; valid targets: {valid}")
                if name not in expanded:
                    expanded.append(name)
        self.targets = expanded
        if self.variant == "dora" and "head" in self.targets:
            raise UserError("lora.variant dora cannot take the head target: the head runs a loss chunk at a time, and "
                            "DoRA's row norms over the whole vocabulary would be recomputed for every chunk; drop "
                            "'head' from the targets or use variant lora")

    @property
    def scaling(self) -> float:
        return self.alpha / math.sqrt(self.r) if self.use_rslora else self.alpha / self.r

    def to_dict(self) -> dict:
        return asdict(self)


class LoRADropout(nn.Module):
    """Inverted dropout with a mask drawn as 15-bit random integers instead of nn.Dropout's bernoulli draws:
    integer draws are cheaper than float ones on CPU, and the backward pass keeps a 1-byte mask instead of a
    2-byte one. The probability is rounded to a multiple of 1/32768."""

    def __init__(self, p: float) -> None:
        super().__init__()
        self.p = p
        self.threshold = round(p * 32768)  # drop where a uniform integer in [0, 32768) is below this
        self.scale = 32768 / (32768 - self.threshold)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.threshold == 0:
            return x
        drop = torch.empty(x.shape, dtype=torch.int16, device=x.device).random_() < self.threshold
        return x.mul(self.scale).masked_fill_(drop, 0)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class LoRALinear(nn.Linear):
    """An nn.Linear whose weight and bias are the base layer's own tensors, plus a trainable low-rank update
    (and with `dora`, a trainable magnitude per output row)."""

    def __init__(self, base: nn.Linear, r: int, scaling: float, dropout: float, dtype: torch.dtype = torch.float32,
                 dora: bool = False) -> None:
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        self.weight, self.bias = base.weight, base.bias  # shared, not copied
        device = base.weight.device
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=device, dtype=dtype))
        self.scaling = scaling
        self.lora_dropout = LoRADropout(dropout) if dropout > 0 else nn.Identity()
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        if dora:
            # W is frozen, so its rows' squared norms are computed once; they start the magnitude at ||W||.
            norm_sq = dequantized(self.weight, torch.float32).pow(2).sum(1)  # an NF4 weight dequantised
            self.register_buffer("weight_norm_sq", norm_sq, persistent=False)
            self.lora_magnitude = nn.Parameter(self.weight_norm_sq.sqrt().to(dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapt(x, linear(x, self.weight, self.bias))  # F.linear, or the NF4 product over a QLoRA base

    def adapt(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The layer's output for input x given the base's output y = W x + b (computed once for several adapters
        when they are trained together, multi_lora)."""
        lora_x = self.lora_dropout(x).to(self.lora_A.dtype)
        update = F.linear(F.linear(lora_x, self.lora_A), self.lora_B) * self.scaling
        if not hasattr(self, "lora_magnitude"):
            return y + update.to(y.dtype)
        return self._dora(x, y, lora_x, update)

    def _dora(self, x: torch.Tensor, y: torch.Tensor, lora_x: torch.Tensor, update: torch.Tensor) -> torch.Tensor:
        """m / ||W + s B A|| * (W x' + s B A x') + b as PEFT computes it: y + (g - 1) W x' + g s B A x', where x'
        is x after dropout (without dropout W x' is y - b, and no second product is needed)."""
        g = self.lora_magnitude / self._updated_norm()
        if isinstance(self.lora_dropout, nn.Identity) or not self.training:
            base = y if self.bias is None else y - self.bias
        else:
            base = linear(lora_x.to(x.dtype), self.weight)
        return (y + (g - 1) * base + g * update).to(y.dtype)

    @torch.no_grad()
    def _updated_norm(self) -> torch.Tensor:
        """||W + s B A|| per row, without forming the (out, in) matrix: ||W||^2 + 2 s <B, W A^T> + s^2 <B A A^T, B>
        per row, in fp32 (r x out work for the last two terms, after one r x in x out product)."""
        A, B, s = self.lora_A.float(), self.lora_B.float(), self.scaling
        WA = linear(A.to(self.weight.dtype), self.weight).float().T  # (out, r), NF4 weights dequantised on the fly
        sq = self.weight_norm_sq + 2 * s * (B * WA).sum(1) + s * s * ((B @ (A @ A.T)) * B).sum(1)
        return sq.clamp(min=0).sqrt().to(self.lora_magnitude.dtype)

    def extra_repr(self) -> str:
        dora = ", dora" if hasattr(self, "lora_magnitude") else ""
        return f"{super().extra_repr()}, r={self.lora_A.shape[0]}, scaling={self.scaling:g}{dora}"


def merged_weight(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float,
                  dtype: torch.dtype | None = None, magnitude: torch.Tensor | None = None) -> torch.Tensor:
    """W + s * B A (DoRA: its rows rescaled to the magnitudes), computed in fp32 on W's device (adapters are read onto
    the CPU, the model may be on a GPU) and cast to `dtype` (default: the weight's own dtype, never a silent upcast).
    The one merge: merge-lora and generate both call it, so their weights are bit-identical."""
    A, B = lora_A.to(weight.device, torch.float32), lora_B.to(weight.device, torch.float32)
    merged = weight.float() + (B @ A) * scaling  # (out, r) @ (r, in) -> (out, in)
    if magnitude is not None:
        merged *= (magnitude.to(weight.device, torch.float32) / merged.norm(dim=1)).unsqueeze(1)
    return merged.to(dtype or weight.dtype)


def target_layers(model: nn.Module, targets: list[str]) -> list[tuple[nn.Module, str]]:
    """(parent module, attribute name) of every linear layer a target list selects."""
    found = []
    for name in targets:
        attr = TARGETS[name]
        if name == "head":
            found.append((model, attr))
            continue
        for block in model.layers:
            parent = block.self_attn if hasattr(block.self_attn, attr) else block.mlp
            found.append((parent, attr))
    return found


def apply_lora(model: nn.Module, config: LoRAConfig, dtype: torch.dtype = torch.float32) -> nn.Module:
    """Wrap the targeted layers of `model` in place; the base tensors are shared, not copied."""
    if "head" in config.targets and model.config.tie_embeddings:
        raise UserError(
            "LoRA on the output head is not supported for models with tied embeddings "
            "(merging it would also change the input embeddings); drop 'head' from the targets"
        )
    for parent, attr in target_layers(model, config.targets):
        layer = getattr(parent, attr)
        if isinstance(layer, LoRALinear):
            raise ValueError(f"{attr} already carries LoRA")
        setattr(parent, attr, LoRALinear(layer, config.r, config.scaling, config.dropout, dtype,
                                         dora=config.variant == "dora"))
    model.lora_config = config
    return model


def lora_layers(model: nn.Module) -> list[LoRALinear]:
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def mark_only_lora_as_trainable(model: nn.Module) -> None:
    for name, param in model.named_parameters():
        param.requires_grad = "lora_" in name


def optimizer_groups(trainable: list[tuple[str, nn.Parameter]], lora_plus_ratio: float | None = None) -> list[dict]:
    """Named trainable parameters as AdamW's param groups, each with `lr_scale`, its learning rate over the schedule's.
    LoRA+ (Hayou et al. 2024): B learns `lora_plus_ratio` times faster than A (and a DoRA magnitude, as A)."""
    if lora_plus_ratio is None:
        return [{"params": [p for _, p in trainable], "lr_scale": 1.0}]
    return [{"params": [p for name, p in trainable if not name.endswith("lora_B")], "lr_scale": 1.0},
            {"params": [p for name, p in trainable if name.endswith("lora_B")], "lr_scale": lora_plus_ratio}]


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Exactly the LoRA tensors, under the model's own parameter names."""
    return {name: p for name, p in model.named_parameters() if "lora_" in name}


def load_lora_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy adapter tensors into the model's LoRA parameters; names and shapes must match exactly."""
    copy_lora_tensors(lora_state_dict(model), state)


def copy_lora_tensors(own: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> None:
    """Copy `state` into the parameters `own` (by name), which it must match exactly."""
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise UserError(
            f"adapter does not fit this model: {len(missing)} LoRA tensors missing (e.g. {missing[:2]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:2]}); was it trained with other targets or another base?"
        )
    with torch.no_grad():
        for name, param in own.items():
            if state[name].shape != param.shape:
                raise UserError(
                    f"adapter tensor {name} has shape {tuple(state[name].shape)}, the model expects "
                    f"{tuple(param.shape)}: the adapter was trained for another base model or rank"
                )
            param.copy_(state[name])


@contextlib.contextmanager
def lora_applied(model: nn.Module, config: LoRAConfig, state: dict[str, torch.Tensor],
                 dtype: torch.dtype = torch.float32):
    """Inside the block the model carries an adapter's LoRA layers, unmerged as in training; after it, its own
    layers again (the base tensors were shared throughout, never copied or changed)."""
    originals = [(parent, attr, getattr(parent, attr)) for parent, attr in target_layers(model, config.targets)]
    apply_lora(model, config, dtype)
    try:
        load_lora_state_dict(model, state)
        yield model
    finally:
        for parent, attr, layer in originals:
            setattr(parent, attr, layer)
        del model.lora_config
