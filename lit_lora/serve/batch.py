"""One forward pass for rows that use different adapters, at different positions: what serving needs of the model.

A served batch is not generate's: its rows joined at different times, so each row has its own position and its
own adapter. Two pieces make the model take such a batch without changing model.py's math:

- **`SlotCache`**, a KV cache of `max_rows` rows plus one for prefilling: a forward pass covers the rows
  `Rows.start : Rows.stop`, each writing its new keys at its own positions. Running requests hold rows
  0..n-1 (a view, never a gather); a request is prefilled in the spare row and then copied into row n.
- **`MultiLoRA`**, beside each adapted linear layer (the fused q/k/v and gate/up ones too): the base product once
  for every row, then each row's own low-rank update, gathered by its adapter slot, as Punica's BGMV and
  vLLM's CPU path do: x A[slot]^T B[slot]^T. Nothing is merged and nothing is copied per request. Slot 0 is
  the base (zeros); the others hold the resident adapters (`AdapterTable`), zero-padded to the largest rank
  in each layer, each B already multiplied by its adapter's scaling.

`Rows` is the one object the engine sets before each forward pass; every cache and LoRA layer reads it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

from lit_lora.lora import TARGETS
from lit_lora.model import KVCache, LLaMA

# A fused decoding layer (fast_decode) and the layers whose outputs it lays side by side.
FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}


@dataclass
class Rows:
    """The cache rows a forward pass covers and each row's adapter slot (B,)."""
    start: int = 0
    stop: int = 0
    adapters: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))


class SlotCache(KVCache):
    """KVCache whose rows are the served requests: positions (B, T) per row, rows chosen by `Rows`."""

    def __init__(self, rows: Rows, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.rows = rows

    def update(self, input_pos: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        r = slice(self.rows.start, self.rows.stop)
        where = input_pos[:, None, :, None].expand_as(k)  # (B, G, T, D): each row's own positions
        self.k[r].scatter_(2, where, k.to(self.k.dtype))
        self.v[r].scatter_(2, where, v.to(self.v.dtype))
        return self.k[r], self.v[r]

    def move(self, source: int, target: int, length: int) -> None:
        self.k[target, :, :length] = self.k[source, :, :length]
        self.v[target, :, :length] = self.v[source, :, :length]


class MultiLoRA(nn.Module):
    """A linear layer plus every row's own adapter: `parts` name the adapted layers whose outputs it computes
    (one, or the q/k/v or gate/up a fused layer lays side by side), each with stacked A (slots, r, in) and
    B (slots, out, r)."""

    def __init__(self, base: nn.Module, parts: list[tuple[str, int]], rows: Rows, slots: int) -> None:
        super().__init__()
        self.base, self.rows = base, rows
        self.sizes = [size for _, size in parts]
        weight = base.weight
        self.dtype = weight.dtype  # the activations' (an NF4 or int8 layer keeps its original dtype here)
        self.A = [weight.new_zeros(slots, 0, base.in_features, dtype=self.dtype) for _ in parts]
        self.B = [weight.new_zeros(slots, size, 0, dtype=self.dtype) for size in self.sizes]
        self.used = [False] * len(parts)  # a part no resident adapter adapts costs nothing

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not any(self.used):
            return y
        slots = self.rows.adapters
        h, offset = x.to(self.dtype).reshape(len(slots), -1, x.shape[-1]), 0  # (B, T, in); the head gets (B, in)
        for A, B, size, used in zip(self.A, self.B, self.sizes, self.used):
            if used:  # (B, T, in) @ (B, in, r) @ (B, r, out), each row with its own adapter's A and B
                delta = torch.bmm(torch.bmm(h, A[slots].transpose(1, 2)), B[slots].transpose(1, 2))
                y[..., offset : offset + size] += delta.view(*y.shape[:-1], size).to(y.dtype)
            offset += size
        return y

    def put(self, slot: int, part: int, A: torch.Tensor | None, B: torch.Tensor | None) -> None:
        """Adapter tensors into `slot` (None: this adapter leaves the part alone: zeros). A part's stacks grow to
        the largest rank put into it, zero-padded (a smaller rank's extra rows and columns add 0); a part no
        adapter touches stays empty, so the slots cost memory only where adapters are."""
        if A is not None and A.shape[0] > self.A[part].shape[1]:
            grow = A.shape[0] - self.A[part].shape[1]
            old_A, old_B = self.A[part], self.B[part]
            self.A[part] = torch.cat([old_A, old_A.new_zeros(old_A.shape[0], grow, old_A.shape[2])], dim=1)
            self.B[part] = torch.cat([old_B, old_B.new_zeros(old_B.shape[0], old_B.shape[1], grow)], dim=2)
        self.A[part][slot].zero_()
        self.B[part][slot].zero_()
        if A is not None:
            r = A.shape[0]
            self.A[part][slot, :r] = A
            self.B[part][slot, :, :r] = B
            self.used[part] = True


def adapted_layers(model: LLaMA) -> list[tuple[nn.Module, str, list[tuple[str, int]]]]:
    """(parent, attribute, parts) of every layer an adapter can target, in the model as prepared for decoding:
    a fused layer's parts are the layers it fuses (by their state-dict prefix), a plain layer is its own part."""
    found = []
    attrs = set(TARGETS.values()) - {"lm_head"}
    for i, block in enumerate(model.layers):
        for kind, parent in (("self_attn", block.self_attn), ("mlp", block.mlp)):
            prefix = f"layers.{i}.{kind}"
            fused = [a for a in FUSED if hasattr(parent, a)]
            covered = {p for a in fused for p in FUSED[a]}
            for attr in fused:
                found.append((parent, attr, [(f"{prefix}.{p}", getattr(parent, p).out_features) for p in FUSED[attr]]))
            for attr in sorted(attrs - covered):
                if isinstance(getattr(parent, attr, None), nn.Module):
                    found.append((parent, attr, [(f"{prefix}.{attr}", getattr(parent, attr).out_features)]))
    found.append((model, "lm_head", [("lm_head", model.lm_head.out_features)]))
    return found


class AdapterTable:
    """The adapters resident in the model's MultiLoRA layers: slot 0 the base, 1..capacity the adapters."""

    def __init__(self, model: LLaMA, rows: Rows, capacity: int) -> None:
        self.capacity = capacity
        self.layers: dict[str, tuple[MultiLoRA, int]] = {}  # adapted layer's prefix -> (its MultiLoRA, part)
        for parent, attr, parts in adapted_layers(model):
            layer = MultiLoRA(getattr(parent, attr), parts, rows, capacity + 1)
            setattr(parent, attr, layer)
            for i, (name, _) in enumerate(parts):
                self.layers[name] = (layer, i)

    def put(self, slot: int, state: dict[str, torch.Tensor], scaling: float) -> None:
        """An adapter's LoRA tensors ({prefix}.lora_A / .lora_B, checked to fit the base) into `slot`."""
        for prefix, (layer, part) in self.layers.items():
            A, B = state.get(f"{prefix}.lora_A"), state.get(f"{prefix}.lora_B")
            layer.put(slot, part, A, None if B is None else B.float() * scaling)

    def clear(self, slot: int) -> None:
        for layer, part in self.layers.values():
            layer.put(slot, part, None, None)


def use_slots(model: LLaMA, rows: Rows, max_rows: int, max_len: int) -> list[SlotCache]:
    """Give every attention layer a SlotCache of `max_rows` rows and a spare one for prefilling."""
    weight = model.embed_tokens.weight
    caches = []
    for block in model.layers:
        attn = block.self_attn
        attn.kv_cache = SlotCache(rows, max_rows + 1, max_len, attn.n_kv_heads, attn.head_dim, weight.dtype,
                                  weight.device)
        caches.append(attn.kv_cache)
    model.cache_len = max_len
    return caches
