"""finetune-lora --sweep r=1,2,4,8 [--sweep variant=lora,dora]: one recipe as several adapters, and which one to keep.

The combinations become `adapters:` (train_config.sweep_adapters), trained together over one base (in groups of
`group` when memory asks for it), each in out_dir/<name>/ as if trained alone. Then `evaluate` scores the base and
every final adapter on the validation split in one run over one loaded base (loss, and exact match of greedy
answers against the references), and out_dir gets sweep.csv, sweep.md and sweep.png: validation loss, exact
match and adapter size against r, one line per variant.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import itertools
import json
import time
import typing
from pathlib import Path
from typing import Any

import yaml
from lightning_fabric.utilities.rank_zero import rank_zero_only

from lit_lora.errors import UserError
from lit_lora.fileio import atomic_file, atomic_write_bytes, write_json, write_yaml
from lit_lora.lora import VARIANTS
from lit_lora.train_config import AdapterEntry, TrainConfig, check_type

COLUMNS = ("name", "r", "variant", "use_rslora", "alpha", "learning_rate", "trainable_params", "adapter_bytes",
           "val_loss", "exact_match", "exact_match_normalized", "train_wall_time_s")


SWEEP_KEYS = {"r": "r", "alpha": "alpha", "dropout": "dropout", "variant": "", "use_rslora": "",
              "learning_rate": "lr", "lora_plus_ratio": "plus"}  # key -> its prefix in the adapters' names


def sweep_adapters(specs: list[str]) -> list[AdapterEntry]:
    """`--sweep r=1,2,4 --sweep variant=lora,dora` as adapters: one per combination, named by its values (r4-dora)."""
    axes = []
    for spec in specs:
        key, sep, values = spec.partition("=")
        if not sep or key not in SWEEP_KEYS or not values.strip():
            raise UserError(f"--sweep {spec!r} is not KEY=V1,V2,...; KEY is one of {', '.join(SWEEP_KEYS)}")
        if key in (k for k, _ in axes):
            raise UserError(f"--sweep names {key} twice; give all its values in one --sweep {key}=...")
        axes.append((key, [_sweep_value(key, text.strip()) for text in values.split(",")]))
    entries = []
    for combination in itertools.product(*(values for _, values in axes)):
        parts = [_name_part(key, value) for (key, _), value in zip(axes, combination)]
        values = dict(zip((key for key, _ in axes), combination))
        entries.append(AdapterEntry(name="-".join(p for p in parts if p) or "lora", **values))
    return entries


def _sweep_value(key: str, text: str) -> Any:
    what = {"r": "a rank (a whole number >= 1)", "use_rslora": "true or false",
            "variant": f"one of {', '.join(VARIANTS)}"}.get(key, f"a value of {key}")
    try:
        value = check_type(yaml.safe_load(text) if key != "variant" else text, typing.get_type_hints(AdapterEntry)[key],
                           key)
        if (key == "r" and value < 1) or (key == "variant" and value not in VARIANTS):
            raise UserError("")
    except (UserError, yaml.YAMLError):
        raise UserError(f"--sweep {key}: {text!r} is not {what}") from None
    return value


def _name_part(key: str, value: Any) -> str:
    if key == "use_rslora":
        return "rslora" if value else ""
    if isinstance(value, float):  # a folder and module name: no dots (0.001 -> 0p001)
        return SWEEP_KEYS[key] + f"{value:g}".replace(".", "p").replace("+", "")
    return f"{SWEEP_KEYS[key]}{value}"


def expand(config: TrainConfig, specs: list[str]) -> TrainConfig:
    """The config with the sweep's combinations as its adapters (each checked now)."""
    if config.adapters:
        raise UserError("the config already lists adapters:; give either adapters: or --sweep")
    return dataclasses.replace(config, adapters=sweep_adapters(specs))


def run_sweep(config: TrainConfig, resume: str | None, group: int | None) -> bool:
    """Train every adapter of the sweep, then score and report them; True when interrupted (nothing reported)."""
    from lit_lora.data.dataset import PreparedDataset
    from lit_lora.finetune import finetune

    if group is not None and group < 1:
        raise UserError(f"--sweep_group must be >= 1, got {group}")
    if (Path(config.data_dir) / "meta.json").is_file() and len(PreparedDataset(config.data_dir, "val")) == 0:
        raise UserError(f"{config.data_dir} has no validation examples (prepared with --val_size 0), and the sweep "
                        f"scores each adapter on them; prepare it with a validation split")
    size = group or fitting_group(config)
    if size < len(config.adapters):
        print(f"note: training the sweep's {len(config.adapters)} adapters {size} at a time"
              + ("" if group else " (all at once would not fit in the memory available here; --sweep_group to choose)"))
    walls: dict[str, float] = {}
    for start in range(0, len(config.adapters), size):
        chunk = config.adapters[start : start + size]
        began = time.perf_counter()
        if finetune(dataclasses.replace(config, adapters=chunk), resume)["interrupted"]:
            return True
        walls.update({entry.name: round(time.perf_counter() - began, 1) for entry in chunk})
    if rank_zero_only.rank != 0:  # under DDP every process ran the training; one scores and writes
        return False
    out_dir = Path(config.out_dir)
    summaries = {name: json.loads((Path(solo.out_dir) / "summary.json").read_text())
                 for name, solo in config.solo_configs().items()}
    write_yaml(out_dir / "config.yaml", config.to_dict())  # the whole sweep, not its last group
    write_json(out_dir / "summary.json", {"adapters": summaries})
    rows = score(config, summaries, walls, batch_size=min(16, config.train.micro_batch_size * size))
    write_report(out_dir, rows)
    print(f"sweep: {len(rows) - 1} adapters scored on the validation split; table and plot in {out_dir}/"
          f"sweep.md, sweep.csv, sweep.png")
    print(markdown(rows))
    return False


def fitting_group(config: TrainConfig) -> int:
    """How many of the sweep's adapters to train at once: all, unless the memory plan (finetune-lora --dry-run) of
    that many exceeds 80% of the memory available now; on a GPU, or where that is unknown, all."""
    import torch

    available = available_memory()
    if available is None or (config.accelerator != "cpu" and torch.cuda.is_available()):
        return len(config.adapters)
    from lit_lora.memory_plan import training_plan

    for together in range(len(config.adapters), 0, -1):
        planned, _ = training_plan(config, together)
        if planned is None or planned.total(config.train.gradient_checkpointing) <= 0.8 * available:
            return together
    return 1


def available_memory() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (Linux), else None."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def score(config: TrainConfig, summaries: dict[str, dict[str, Any]], walls: dict[str, float],
          batch_size: int) -> list[dict[str, Any]]:
    """One row per adapter (and the base first): its settings, size (from its run's summary) and validation scores
    (all on config.data_dir: a sweep's adapters differ only in the swept keys)."""
    from lit_lora.evaluate import evaluate

    solos = config.solo_configs()
    finals = {name: Path(solo.out_dir) / "final" for name, solo in solos.items()}
    result = evaluate(Path(config.checkpoint_dir), Path(config.data_dir), list(finals.values()), split="val",
                      metric="both", batch_size=batch_size,
                      max_new_tokens=config.eval.max_new_tokens, precision=config.precision, verify=config.verify,
                      quantize=config.quantize)
    scores = {Path(m["name"]).parent.name if m["name"] != "base" else "base": m for m in result["models"]}
    rows = [{"name": "base", "r": 0, "val_loss": scores["base"]["loss"], "exact_match": scores["base"]["exact_match"],
             "exact_match_normalized": scores["base"]["exact_match_normalized"], "trainable_params": 0,
             "adapter_bytes": 0}]
    for name, solo in solos.items():
        lora, s = solo.lora, scores[name]
        rows.append({"name": name, "r": lora.r, "variant": lora.variant, "use_rslora": lora.use_rslora,
                     "alpha": lora.alpha, "learning_rate": solo.train.learning_rate,
                     "trainable_params": summaries[name]["trainable_params"],
                     "adapter_bytes": summaries[name]["adapter_bytes"], "val_loss": s["loss"],
                     "exact_match": s["exact_match"], "exact_match_normalized": s["exact_match_normalized"],
                     "train_wall_time_s": walls.get(name)})
    return rows



def markdown(rows: list[dict[str, Any]]) -> str:
    head = ["adapter", "r", "variant", "val loss", "exact match", "normalised", "params", "size (KB)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows:
        variant = row.get("variant", "") + (" rsLoRA" if row.get("use_rslora") else "")
        lines.append(f"| {row['name']} | {row['r']} | {variant} | {row['val_loss']:.4f} | "
                     f"{row['exact_match']:.1%} | {row['exact_match_normalized']:.1%} | {row['trainable_params']:,} | "
                     f"{row['adapter_bytes'] / 1e3:.0f} |")
    return "\n".join(lines)


def write_report(out_dir: Path, rows: list[dict[str, Any]]) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_bytes(out_dir / "sweep.csv", buffer.getvalue().encode())
    atomic_write_bytes(out_dir / "sweep.md", (markdown(rows) + "\n").encode())
    write_json(out_dir / "sweep.json", {"rows": rows})
    plot(out_dir / "sweep.png", rows)


def plot(path: Path, rows: list[dict[str, Any]]) -> None:
    """Validation loss, exact match and adapter size against r (log scale), one line per variant; the base's scores
    in the panels' titles."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed: no sweep.png")
        return
    base, adapters = rows[0], rows[1:]
    lines: dict[str, list[dict[str, Any]]] = {}
    for row in adapters:
        lines.setdefault(row["variant"] + (" + rsLoRA" if row["use_rslora"] else ""), []).append(row)
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    panels = (("val_loss", "validation loss", f"base {base['val_loss']:.3f}", 1),
              ("exact_match", "exact match", f"base {base['exact_match']:.1%}", 1),
              ("adapter_bytes", "adapter size (MB)", None, 1e-6))
    ranks = sorted({row["r"] for row in adapters})
    for ax, (key, label, title, unit) in zip(axes, panels):
        for variant, points in lines.items():
            points = sorted(points, key=lambda p: p["r"])
            ax.plot([p["r"] for p in points], [p[key] * unit for p in points], marker="o", label=variant)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ranks, [str(r) for r in ranks])
        ax.set_xlabel("r")
        ax.set_ylabel(label)
        if title:  # the base beside the adapters would flatten their differences: given as a number instead
            ax.set_title(title, fontsize=9)
    axes[2].set_yscale("log")
    axes[0].legend()
    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
