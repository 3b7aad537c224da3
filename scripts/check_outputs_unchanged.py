"""Check that a refactor changed no output: run the same commands with two versions of lit-lora and compare files.

    python scripts/check_outputs_unchanged.py BASE_REV      # e.g. the commit before the refactor

The base revision is checked out into a temporary git worktree. Both versions run, with PYTHONPATH pointing at
their own tree, in the same directory (so recorded paths agree): prepare-alpaca (chatml), a short finetune-lora
(32-true, tiny model), merge-lora, export-hf and export-peft, all on one tiny checkpoint built once beforehand.
Every output file is hashed (safetensors with its header keys sorted: see file_hash); timing files (metrics.csv, summary.json, loss.png, tensorboard) are left out.
Exit code 0 when all hashes agree, 1 otherwise. A base revision before 2026-12-01 wrote its adapters' safetensors
metadata in a random order, so its weights_sha256 (and training_state.pt) differ by chance: run it again.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SKIP = {"metrics.csv", "summary.json", "loss.png"}


def run_flow(tree: Path, work: Path, checkpoint: Path, records: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}

    def cli(*args: str) -> None:
        result = subprocess.run([sys.executable, "-m", "lit_lora.cli", *args], env=env, cwd=work,
                                capture_output=True, text=True)
        if result.returncode:
            sys.exit(f"{args[0]} failed with {tree}:\n{result.stderr}")

    cli("prepare-alpaca", "--checkpoint_dir", str(checkpoint), "--data_file", str(records),
        "--destination", "data", "--template", "chatml", "--max_seq_length", "64", "--val_size", "8")
    cli("finetune-lora", "--config", str(ROOT / "configs" / "tiny.yaml"), "--checkpoint_dir", str(checkpoint),
        "--data_dir", "data", "--out_dir", "run", "--eval.max_new_tokens", "2")
    cli("merge-lora", "--checkpoint_dir", str(checkpoint), "--lora_path", "run/final", "--out", "merged")
    cli("export-hf", "--checkpoint_dir", "merged", "--out", "hf")
    cli("export-peft", "--lora_path", "run/final", "--out", "peft", "--base_model_name_or_path", "tiny")


def file_hash(path: Path) -> str:
    """sha256 of the bytes; for safetensors, of the header with sorted keys and the data, because the
    safetensors library writes metadata keys in hash-map order, which differs from run to run."""
    data = path.read_bytes()
    if path.suffix == ".safetensors":
        n = int.from_bytes(data[:8], "little")
        data = json.dumps(json.loads(data[8 : 8 + n]), sort_keys=True).encode() + data[8 + n :]
    return hashlib.sha256(data).hexdigest()


def hashes(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): file_hash(p) for p in sorted(directory.rglob("*"))
            if p.is_file() and p.name not in SKIP and "tensorboard" not in p.parts}


def main(base_rev: str) -> int:
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import make_tiny_checkpoint  # the tests' tiny model: random weights, a small BPE tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base_tree = tmp / "base-tree"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(base_tree), base_rev],
                       check=True, capture_output=True)
        try:
            checkpoint = make_tiny_checkpoint(tmp / "inputs" / "tiny")
            records = tmp / "inputs" / "records.json"
            records.write_text(json.dumps([{"instruction": f"Say the number {i}.", "input": "",
                                            "output": f"The number is {i}. " * (1 + i % 3)} for i in range(40)]))
            results = {}
            for name, tree in (("base", base_tree), ("current", ROOT)):
                work = tmp / "work"
                work.mkdir()
                run_flow(tree, work, checkpoint, records)
                results[name] = hashes(work)
                shutil.rmtree(work)
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base_tree)], check=False)
    base, current = results["base"], results["current"]
    differ = sorted(k for k in base.keys() | current.keys() if base.get(k) != current.get(k))
    for name in differ:
        print(f"DIFFERS  {name}: {base.get(name, 'absent')[:12]} -> {current.get(name, 'absent')[:12]}")
    print(f"{len(base)} files compared against {base_rev}: {'all identical' if not differ else f'{len(differ)} differ'}")
    return 1 if differ else 0


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    sys.exit(main(sys.argv[1]))
