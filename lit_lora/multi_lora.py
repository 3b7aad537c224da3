"""Several adapters trained together over one frozen base: the base product once, each row through its own adapter.

A training step concatenates one micro-batch per adapter (each padded to the longest; causal attention keeps a row's
real tokens from seeing its padding), and every adapted layer becomes a `MultiAdapterLinear`: the base product
W x + b once for all rows, then each adapter's `LoRALinear.adapt` on its own rows, cut back to its own micro-batch's
length. An adapter's rows are one contiguous slice, so this is a slice per adapter where serving (serve.batch.MultiLoRA)
gathers per row; the adapters keep their own tensors, so each has its own optimizer, clipping and learning rate.

Exactly what each adapter would get alone, dropout included: the adapters draw from one random number generator
state each (`AdapterRNG`), swapped into torch's generator around each adapter's draws, so each sees the stream
a run of it alone would, in its own micro-batch's shape; its state is what its checkpoints save, and a block
recomputed under gradient checkpointing restores them too. An adapter's tensors and checkpoints carry the names
a model with only that adapter gives them (`adapter_parameters`).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from lit_lora.device import rng_state, set_rng_state
from lit_lora.lora import LoRAConfig, LoRALinear, target_layers
from lit_lora.quantize import linear


@dataclass
class Routing:
    """Which rows of a forward pass belong to which adapter: (name, first row, end row, its own length) each; with
    `only` set every row goes through that one adapter (validation, samples)."""

    parts: list[tuple[str, int, int, int]] = field(default_factory=list)
    only: str | None = None

    @contextlib.contextmanager
    def split(self, parts: list[tuple[str, int, int, int]]):
        self.parts = parts
        try:
            yield
        finally:
            self.parts = []

    @contextlib.contextmanager
    def alone(self, name: str):
        self.only = name
        try:
            yield
        finally:
            self.only = None


class AdapterRNG:
    """One generator state per adapter, on the device its dropout draws on, swapped in around its draws."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.states = device, {}

    @contextlib.contextmanager
    def use(self, name: str):
        outside = rng_state(self.device)
        set_rng_state(self.states[name], self.device)
        try:
            yield
        finally:
            self.states[name] = rng_state(self.device)
            set_rng_state(outside, self.device)

    def to(self, device: torch.device) -> None:
        """The model moved to a GPU: dropout draws from that device's own generator, untouched since seeding, as
        each adapter's run alone there would (the tensors were initialised on the CPU, from its generator)."""
        if device != self.device:
            self.device, self.states = device, {name: rng_state(device) for name in self.states}

    def checkpoint_contexts(self):
        """torch.utils.checkpoint's context_fn: the recomputed block draws what its first forward did."""
        at_forward: dict[str, torch.Tensor] = {}

        @contextlib.contextmanager
        def forward():
            at_forward.update(self.states)  # states are replaced on every use, never changed in place
            yield

        @contextlib.contextmanager
        def recompute():
            now = dict(self.states)
            self.states.update(at_forward)
            try:
                yield
            finally:
                self.states.update(now)

        return forward(), recompute()


class MultiAdapterLinear(nn.Module):
    """A frozen linear layer and the adapters that target it (a ModuleDict of LoRALinears sharing its tensors)."""

    def __init__(self, base: nn.Linear, routing: Routing, rng: AdapterRNG) -> None:
        super().__init__()
        self.base, self.routing, self.rng = base, routing, rng
        self.adapters = nn.ModuleDict()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = linear(x, self.base.weight, self.base.bias)
        if self.routing.only is not None:
            return self._adapt(self.routing.only, x, y)
        pieces = []
        for name, start, stop, length in self.routing.parts:
            rows = y[start:stop]
            if name in self.adapters:
                rows = torch.cat([self._adapt(name, x[start:stop, :length], rows[:, :length]), rows[:, length:]], 1)
            pieces.append(rows)
        return torch.cat(pieces)

    def _adapt(self, name: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if name not in self.adapters:
            return y
        with self.rng.use(name):
            return self.adapters[name].adapt(x, y)


def apply_adapters(model: nn.Module, configs: dict[str, LoRAConfig], dtype: torch.dtype) -> AdapterRNG:
    """Give `model` every adapter in `configs`; returns their generator states. Each adapter's tensors are
    initialised from the generator state the model was loaded with, in the order `apply_lora` would."""
    device = model.lm_head.weight.device
    routing, rng = Routing(), AdapterRNG(device)
    start = rng_state(device)
    for name, config in configs.items():
        set_rng_state(start, device)
        for parent, attr in target_layers(model, config.targets):
            layer = getattr(parent, attr)
            if not isinstance(layer, MultiAdapterLinear):
                layer = MultiAdapterLinear(layer, routing, rng)
                setattr(parent, attr, layer)
            layer.adapters[name] = LoRALinear(layer.base, config.r, config.scaling, config.dropout, dtype,
                                              dora=config.variant == "dora")
        rng.states[name] = rng_state(device)
    set_rng_state(start, device)
    model.routing, model.lora_configs = routing, dict(configs)
    model.recompute_context = rng.checkpoint_contexts
    return rng


def adapter_parameters(model: nn.Module, name: str | None) -> list[tuple[str, nn.Parameter]]:
    """Adapter `name`'s trainable tensors under the names a model with only that adapter gives them (None: a model
    with one adapter, apply_lora's, as it is), in that model's order."""
    lora = [(key, p) for key, p in model.named_parameters() if "lora_" in key]
    if name is None:
        return lora
    tag = f"adapters.{name}."
    return [(key.replace(tag, ""), p) for key, p in lora if f".{tag}" in key]


def row_parts(names: list[str | None], batches: list[dict[str, torch.Tensor]]) -> list[tuple]:
    """`Routing.parts` of micro-batches concatenated in order: (adapter, first row, end row, its length) each."""
    parts, start = [], 0
    for name, b in zip(names, batches):
        rows, length = b["input_ids"].shape
        parts.append((name, start, start + rows, length))
        start += rows
    return parts


def split(model: nn.Module, parts: list[tuple[str, int, int, int]]):
    """The model's rows going to their adapters as `parts` say (a model with one adapter: as it is). Held through
    the backward pass too: gradient checkpointing recomputes the blocks there."""
    return model.routing.split(parts) if hasattr(model, "routing") else contextlib.nullcontext()


def alone(model: nn.Module, name: str | None):
    """The model computing with adapter `name` only (None: a model with one adapter, as it is)."""
    return contextlib.nullcontext() if name is None else model.routing.alone(name)
