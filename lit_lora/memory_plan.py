"""What a training run will hold in memory, worked out before anything loads: `finetune-lora --dry-run` prints it.

Weights, LoRA tensors, their gradients and AdamW's two moments are arithmetic on the configs. Activations are
counted, not guessed: one block runs forward on the meta device (shapes only, nothing allocated) under autograd's
saved-tensor hook, which sees every tensor the backward pass will keep, whatever the family's attention or MLP.
Without gradient checkpointing every block keeps that much; with it each keeps only its input, and one block's
worth is rebuilt at a time. A view counts as the whole tensor it views, so the count errs a little high.

The plan is for the longest micro-batch (micro_batch_size x the data's max_seq_length); `benchmarks/scale.py`
prints it beside the measured peak.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from lit_lora.device import PRECISIONS, dtype_name
from lit_lora.lora import LoRAConfig, apply_lora, lora_state_dict, mark_only_lora_as_trainable
from lit_lora.model import LLaMA, Config
from lit_lora.presets import PRESETS
from lit_lora.quantize import is_quantized_weight, nf4_bytes
from lit_lora.train_config import TrainConfig

# PyTorch, Lightning Fabric and the Python process before the model loads: measured here as 355 MiB of RSS (Linux,
# CPU; 440 with the lightning package, whose torchmetrics Fabric's import loads).
RUNTIME_BYTES = 360 * 1024**2


@dataclass
class Plan:
    """Bytes by what holds them; `activations` has both settings of gradient checkpointing."""

    title: str
    fixed: list[tuple[str, int]]  # weights, LoRA, gradients, optimizer state, runtime
    activations: dict[bool, list[tuple[str, int]]]  # checkpointing off / on -> rows
    checkpointing: bool  # what the config asks for

    def total(self, checkpointing: bool) -> int:
        return sum(b for _, b in self.fixed) + sum(b for _, b in self.activations[checkpointing])

    def format(self) -> str:
        width = max(len(what) for what, _ in self.fixed + self.activations[True] + self.activations[False]) + 2
        lines = [self.title]
        lines += [f"  {what:<{width}} {gb(b):>9}" for what, b in self.fixed]
        for on in (False, True):
            chosen = " (configured)" if on == self.checkpointing else ""
            lines.append(f"  with gradient_checkpointing: {str(on).lower()}{chosen}")
            lines += [f"    {what:<{width - 2}} {gb(b):>9}" for what, b in self.activations[on]]
            lines.append(f"    {'total':<{width - 2}} {gb(self.total(on)):>9}")
        return "\n".join(lines)


def gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def plan(config: Config, lora: LoRAConfig, precision: str, quantize: str, micro_batch: int, seq_len: int,
         checkpointing: bool, chunk_size: int = 256) -> Plan:
    """The memory plan of LoRA training of `config` with `lora`, in `precision` (not auto), over a base quantised as
    `quantize`, for micro-batches of `micro_batch` x `seq_len` tokens."""
    base_dtype, lora_dtype = PRECISIONS[precision]
    with torch.device("meta"):
        model = apply_lora(LLaMA(config), lora, dtype=lora_dtype)
    lora_bytes = sum(t.numel() * t.element_size() for t in lora_state_dict(model).values())
    fixed = weight_rows(model, base_dtype, quantize) + [
        (f"LoRA A and B ({dtype_name(lora_dtype)})", lora_bytes),
        ("their gradients", lora_bytes),
        ("AdamW's two moments", 2 * lora_bytes),
        ("PyTorch, Lightning Fabric, Python (measured)", RUNTIME_BYTES),
    ]
    tokens, act_size = micro_batch * seq_len, torch.finfo(base_dtype).bits // 8
    block = block_saved_bytes(config, lora, micro_batch, seq_len, base_dtype, lora_dtype)
    head = [("output head and loss: d loss / d h, one logits chunk",
             tokens * config.dim * act_size + 2 * min(chunk_size, tokens) * config.vocab_size * 4)]
    if quantize == "nf4":
        biggest = max(p.numel() for name, p in model.named_parameters() if is_quantized_weight(name))
        # quantize.dequantized: int32 code pairs (2 bytes a weight) and the weight itself, one product at a time
        head.append(("one weight dequantised (and its codes)", biggest * (2 + act_size)))
    activations = {
        False: [(f"activations, {config.n_layers} blocks", config.n_layers * block),
                ("backward: one block's gradients", block)] + head,
        True: [(f"block inputs kept, {config.n_layers} blocks", config.n_layers * tokens * config.dim * act_size),
               ("one block recomputed, and its gradients", 2 * block)] + head,
    }
    title = (f"memory plan: {config.name}, {precision}, quantize {quantize}, micro-batch {micro_batch} x {seq_len}, "
             f"LoRA r {lora.r} on {', '.join(lora.targets)}")
    return Plan(title, fixed, activations, checkpointing)


def weight_rows(model: LLaMA, dtype: torch.dtype, quantize: str) -> list[tuple[str, int]]:
    """The frozen base: the blocks' linear weights (NF4 or `dtype`) and the rest (embeddings, norms, head)."""
    size = torch.finfo(dtype).bits // 8
    linear = [p.numel() for name, p in model.named_parameters() if is_quantized_weight(name)]
    rest = sum(p.numel() for name, p in model.named_parameters()
               if "lora_" not in name and not is_quantized_weight(name))
    linear_bytes = sum(nf4_bytes(n) for n in linear) if quantize == "nf4" else sum(linear) * size
    kind = "nf4" if quantize == "nf4" else dtype_name(dtype)
    return [(f"base linear weights ({kind})", linear_bytes), (f"embeddings, norms, head ({dtype_name(dtype)})",
                                                               rest * size)]


def block_saved_bytes(config: Config, lora: LoRAConfig, batch: int, seq_len: int, dtype: torch.dtype,
                      lora_dtype: torch.dtype) -> int:
    """Bytes of the tensors one transformer block saves for its backward pass, counted on the meta device."""
    one = Config(**{**config.to_dict(), "n_layers": 1, "local_layers": None, "sliding_window": None})
    with torch.device("meta"):
        model = apply_lora(LLaMA(one).to(dtype), lora, dtype=lora_dtype)
    mark_only_lora_as_trainable(model)
    params = {id(p) for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        whole = t._base if t._base is not None else t
        if id(t) not in params and id(whole) not in params:  # the weights are counted above, not here
            saved[id(whole)] = whole.numel() * whole.element_size()
        return t

    x = torch.empty(batch, seq_len, config.dim, device="meta", dtype=dtype, requires_grad=True)
    pos = torch.arange(seq_len, device="meta")
    cos, sin = model.rope(pos, dtype, local=False)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.layers[0](x, cos, sin, None, pos)
    return sum(saved.values())


# ---------------------------------------------------------------------------------------------- --dry-run
DEFAULT_SEQ_LEN = 512  # prepare-*'s default max_seq_length: the plan's length when no data is prepared yet


def dry_run_plan(config: TrainConfig) -> str:
    """The plan of a training config: its checkpoint (or a preset of that name, for a model not downloaded yet),
    its precision (auto: what this machine would run), and its data's longest padded micro-batch."""
    result, notes = training_plan(config)
    if result is None:
        return notes[0]
    if not config.wants_low_memory():
        notes.append("train.low_memory is off: glibc may keep freed memory resident beyond this plan (SmolLM2 at "
                     "4 x 256 peaked at 2.43 GiB, 1.81 with it on); train.low_memory true for a peak near the plan, at "
                     "slower steps (13% there)")
    return "\n".join([result.format(), *(f"note: {n}" for n in notes)])


def training_plan(config: TrainConfig, together: int | None = None) -> tuple[Plan | None, list[str]]:
    """(the plan, notes) of a training config with `together` of its adapters at once (None: all of them); no plan,
    and the note why, when the checkpoint is neither here nor a preset."""
    from lit_lora.checkpoint import MODEL_CONFIG, load_config
    from lit_lora.data.batching import padded_length
    from lit_lora.data.dataset import PreparedDataset
    from lit_lora.device import resolve_precision

    notes = []
    path = Path(config.checkpoint_dir)
    if (path / MODEL_CONFIG).is_file():
        model_config = load_config(path)
    elif path.name.lower() in PRESETS:
        model_config = Config.from_name(path.name)
        notes.append(f"{path} is not a checkpoint: planned for the preset {path.name}")
    else:  # a config may be written for another machine: the plan is what is missing, not the config
        return None, [f"note: no memory plan: checkpoint_dir {path} is neither a checkpoint here nor a preset "
                      f"({', '.join(PRESETS)})"]
    t, seq_len = config.train, DEFAULT_SEQ_LEN
    if (Path(config.data_dir) / "meta.json").is_file():
        data = PreparedDataset(config.data_dir, "train")
        longest = int(data.lengths.max()) if len(data) else data.meta["max_seq_length"]
        seq_len = data.meta["max_seq_length"] if t.packing else padded_length(longest, t.pad_multiple,
                                                                               data.meta["max_seq_length"])
    else:
        notes.append(f"no prepared data in {config.data_dir}: planned for {seq_len}-token sequences")
    solos = list(config.solo_configs().values())[:together] or [config]
    rows, lora = t.micro_batch_size * len(solos), max((s.lora for s in solos), key=lambda c: c.r * len(c.targets))
    if config.method != "sft":  # DPO's reference pass runs first, without gradients: it keeps no activations
        rows *= 2
        notes.append(f"method {config.method}: planned for {rows} rows, a chosen and a rejected answer per pair")
    if len(solos) > 1:
        notes.append(f"{len(solos)} adapters train together: planned for their micro-batches as one ({rows} rows) "
                     f"and the largest adapter's LoRA tensors once (each adapter adds its own, small beside the rest)")
    precision = resolve_precision(config.precision, config.accelerator)
    return plan(model_config, lora, precision, config.quantize, rows, seq_len, t.gradient_checkpointing,
                t.loss_chunk_size), notes
