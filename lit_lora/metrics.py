"""A run's metrics: metrics.csv (and TensorBoard through Fabric's loggers) as it trains, loss.png at the end.

Rank 0 writes; a resume cuts metrics.csv back to the checkpoint's step, so no row is logged twice or lost.
"""
from __future__ import annotations

import contextlib
import csv
from pathlib import Path
from typing import Any

import lightning_fabric as L

from lit_lora.errors import UserError
from lit_lora.fileio import atomic_write_bytes
from lit_lora.train_state import last_checkpoint_note


class MetricsLog:
    """metrics.csv (and TensorBoard through Fabric's loggers); rank 0 only."""

    COLUMNS = ["step", "epoch", "split", "loss", "perplexity", "lr", "tokens", "tokens_per_s", "elapsed_s",
               "peak_memory_gb"]

    def __init__(self, fabric: L.Fabric, path: Path, resume_step: int | None, extra: tuple[str, ...] = ()) -> None:
        """A new file, or on a resume the existing one cut back to the rows up to `resume_step`; `extra` columns
        after the usual ones (preference tuning's rewards)."""
        self.fabric, self.path, self.columns = fabric, path, [*self.COLUMNS, *extra]
        self.rows: list[dict[str, Any]] = []
        if fabric.global_rank != 0:
            return
        if resume_step is None or not path.is_file():
            with open(path, "w", newline="") as f:
                csv.writer(f).writerow(self.columns)
        else:
            self.truncate(path, resume_step)

    @staticmethod
    def truncate(path: Path, step: int) -> None:
        """Drop the rows logged after `step` (they are logged again), and any torn row; atomically."""
        lines = path.read_text().splitlines(keepends=True)
        keep, columns = lines[:1], len(next(csv.reader(lines[:1]), []))
        for line in lines[1:]:
            fields = next(csv.reader([line]), [])
            with contextlib.suppress(ValueError):
                if len(fields) == columns and int(fields[0]) <= step:
                    keep.append(line if line.endswith("\n") else line + "\n")
        if keep != lines:
            atomic_write_bytes(path, "".join(keep).encode())

    def log(self, **row: Any) -> None:
        self.rows.append(row)
        if self.fabric.global_rank != 0:
            return
        try:
            with open(self.path, "a", newline="") as f:
                csv.DictWriter(f, self.columns).writerow(row)
        except OSError as e:  # a full disk: the checkpoints are what matters
            raise UserError(f"could not write {self.path}: {e.strerror or e}; "
                            f"{last_checkpoint_note(self.path.parent)}; free some space, then continue with "
                            f"--resume auto") from None
        shown = ("loss", "perplexity", "lr", "tokens_per_s", *self.columns[len(self.COLUMNS):])
        values = {f"{row['split']}/{k}": v for k, v in row.items() if k in shown}
        self.fabric.log_dict(values, step=row["step"])


def plot_losses(metrics_csv: Path, out: Path) -> str | None:
    """loss.png from metrics.csv; returns a note instead when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: no loss.png"
    rows = list(csv.DictReader(open(metrics_csv)))
    fig, ax = plt.subplots(figsize=(7, 4))
    for split in ("train", "val"):
        points = [(int(r["step"]), float(r["loss"])) for r in rows if r["split"] == split]
        if points:
            ax.plot(*zip(*points), marker="o" if split == "val" else None, label=split)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / target token)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return None
