"""llama.cpp as the CPU decode engine of `generate` and `chat`, through llama-cpp-python (the `llamacpp` extra).

The checkpoint and each adapter are exported once (export-gguf: the base as a GGUF, each adapter as a llama.cpp
LoRA adapter over it) into $LIT_LORA_CACHE/engine, named by a hash of everything the file is made from (weights,
configs, tokenizer, GGUF type, EXPORT_VERSION), so a checkpoint or adapter that changes is exported again and an
unchanged one never is. What llama.cpp cannot take (a model with biases, a tokenizer GGUF cannot express, a PEFT
adapter) is found before anything loads: `--engine llama.cpp` refuses it, `auto` decodes with torch and says why.
Prompts are rendered and answers cut exactly as with the torch engine (the same PromptFormat ids, stop ids and stop
strings, TextStream); llama.cpp only picks the tokens. Greedy answers are the torch engine's
(tests/test_export_gguf.py); sampled ones follow llama.cpp's own sampler.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path
from typing import Any, Callable, Iterator, TextIO

from lit_lora.adapter import load_adapter
from lit_lora.checkpoint import load_config, load_info, verify_weights
from lit_lora.download import cache_dir
from lit_lora.errors import UserError
from lit_lora.text_stream import Completion, TextStream, stop_ids_for
from lit_lora.tokenizer import Tokenizer

ENGINES = ("torch", "llama.cpp", "auto")
INSTALL = "pip install 'lit-lora[llamacpp]' (it builds llama.cpp from source: about 10 minutes on 2 cores)"
EXPORT_VERSION = 1  # raise when what export-gguf writes changes, so cached files are made again
# torch precision -> GGUF type: the engine computes in the weights' type, as the torch engine does.
GGUF_TYPE = {"32-true": "f32", "bf16-true": "bf16", "bf16-mixed": "bf16", "16-mixed": "f16"}


def open_llama(model_path: Path | str, **kwargs: Any) -> Any:
    """llama_cpp.Llama(model_path, **kwargs), with llama.cpp's extra CPU buffer types (AMX, repacked weights) off on a
    CPU that reports AMX: llama-cpp-python 0.3.36 built on an Intel Xeon with amx_tile here crashed (SIGSEGV) in its
    first decode of a q8_0 model with them on and ran with them off."""
    import llama_cpp

    with _without_extra_buffers() if _has_amx() else contextlib.nullcontext():
        return llama_cpp.Llama(model_path=str(model_path), **kwargs)


@contextlib.contextmanager
def _without_extra_buffers() -> Iterator[None]:
    """Llama() takes no option for them, so the default model parameters it starts from are swapped meanwhile."""
    import llama_cpp.llama_cpp as low

    defaults = low.llama_model_default_params

    def without() -> Any:
        params = defaults()
        params.use_extra_bufts = False
        return params

    low.llama_model_default_params = without
    try:
        yield
    finally:
        low.llama_model_default_params = defaults


def _has_amx() -> bool:
    with contextlib.suppress(OSError):
        return " amx_tile" in Path("/proc/cpuinfo").read_text()
    return False


def available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def choose_engine(engine: str, checkpoint_dir: Path, adapters: list[tuple[Path, dict[str, Any]]], log: TextIO,
                  device: Any = None, quantize: str = "none") -> str:
    """torch or llama.cpp, decided before anything loads. `auto`: llama.cpp where it is installed and can take the
    checkpoint and every adapter ((path, its recorded config), as the caller loaded them), else torch (said once,
    with the reason). llama.cpp runs on the CPU: a GPU `device` (a torch.device) means torch. A `quantize` other
    than none is the torch engine's (llama.cpp has its own GGUF types)."""
    if engine not in ENGINES:
        raise UserError(f"unknown --engine {engine!r}; use one of {', '.join(ENGINES)}")
    if engine == "torch":
        return engine
    if quantize != "none":
        if engine == "llama.cpp":
            raise UserError(f"--quantize {quantize} is the torch engine's (llama.cpp decodes its own GGUF types: "
                            f"export-gguf --type q8_0); use --engine torch, or --quantize none")
        print(f"engine: torch (quantize {quantize})", file=log)
        return "torch"
    on_gpu = device is not None and device.type != "cpu"
    if on_gpu and engine == "llama.cpp":
        raise UserError(f"--engine llama.cpp decodes on the CPU, not on {device}; pass --device cpu or --engine torch")
    if engine == "auto" and on_gpu:  # the torch engine is the GPU path
        return "torch"
    if not available():
        if engine == "auto":
            return "torch"
        raise UserError(f"--engine llama.cpp needs llama-cpp-python: {INSTALL}")
    from lit_lora.export import gguf_problem

    problem = gguf_problem(checkpoint_dir, adapters) or _unhashed(checkpoint_dir)
    if problem and engine == "llama.cpp":
        raise UserError(f"{problem}; llama.cpp cannot decode it: use --engine torch")
    if problem:
        print(f"engine: torch ({problem})", file=log)
        return "torch"
    return "llama.cpp"


def _unhashed(checkpoint_dir: Path) -> str | None:
    if not load_info(checkpoint_dir).get("content_hash"):
        return f"{checkpoint_dir} records no content hash, so its GGUF could not be cached safely"
    return None


def _cached(kind: str, *sources: Any) -> Path:
    """$LIT_LORA_CACHE/engine/KIND-HASH.gguf, the hash over everything the file is made from."""
    key = hashlib.sha256(json.dumps([EXPORT_VERSION, *sources], sort_keys=True, default=str).encode()).hexdigest()
    directory = cache_dir() / "engine"
    directory.mkdir(parents=True, exist_ok=True)
    return directory / f"{kind}-{key[:20]}.gguf"


def base_gguf(checkpoint_dir: Path, gguf_type: str, verify: bool) -> Path:
    from lit_lora.export import export_gguf

    path = _cached(f"model-{gguf_type}", load_info(checkpoint_dir).get("content_hash"),
                   load_config(checkpoint_dir).to_dict(), Tokenizer(checkpoint_dir).identity())
    if not path.is_file():
        export_gguf(path, checkpoint_dir, type=gguf_type, verify=verify, write_modelfile=False)
    elif verify:  # made from the weights when they were intact: are they still?
        verify_weights(checkpoint_dir)
    return path


def adapter_gguf(lora_path: Path, verify: bool) -> Path:
    from lit_lora.export import export_gguf

    *_, meta = load_adapter(lora_path, verify=verify)
    path = _cached("adapter", meta)  # its weights' sha256, rank, alpha, scaling, targets and base config
    if not path.is_file():
        export_gguf(path, lora_path=lora_path, type="f32", verify=verify, write_modelfile=False)
    return path


class LlamaCppEngine:
    """The base GGUF loaded once; each adapter's LoRA GGUF loaded once beside it, and the active one set on the
    context (llama_set_adapters_lora), so switching adapters costs no reload."""

    def __init__(self, checkpoint_dir: Path, precision: str, verify: bool, seed: int | None,
                 n_ctx: int | None = None) -> None:
        from lit_lora.device import resolve_precision

        self.checkpoint_dir, self.verify, self.seed = checkpoint_dir, verify, seed
        # The KV cache llama.cpp allocates: the model's context unless the caller needs less.
        self.n_ctx = min(n_ctx or 1 << 62, load_config(checkpoint_dir).max_seq_len)
        self.model = base_gguf(checkpoint_dir, GGUF_TYPE[resolve_precision(precision, "cpu", training=False)], verify)
        self.llm: Any = None
        self.loras: dict[Path, Any] = {}  # adapter path -> its llama.cpp adapter, freed with the model

    def _load(self) -> Any:
        import llama_cpp
        import torch

        if self.llm is None:
            self.llm = open_llama(self.model, n_ctx=self.n_ctx, n_threads=torch.get_num_threads(),
                                  seed=self.seed if self.seed is not None else llama_cpp.LLAMA_DEFAULT_SEED,
                                  verbose=False)
        return self.llm

    def _lora(self, path: Path) -> Any:
        import llama_cpp

        if path not in self.loras:
            llm = self._load()
            # llama-cpp-python's own lora_path handling does the same through these (its model, context and stack).
            adapter = llama_cpp.llama_adapter_lora_init(llm._model.model, str(adapter_gguf(path, self.verify)).encode())
            if adapter is None:
                raise UserError(f"llama.cpp could not load the adapter exported from {path}; use --engine torch")
            llm._stack.callback(llama_cpp.llama_adapter_lora_free, adapter)
            self.loras[path] = adapter
        return self.loras[path]

    @contextlib.contextmanager
    def adapter(self, path: Path | None, lora_config: Any, state: Any) -> Iterator[Callable]:
        import ctypes

        import llama_cpp

        active = [self._lora(path)] if path is not None else []
        llm = self._load()
        adapters = (llama_cpp.llama_adapter_lora_p_ctypes * len(active))(*active)
        scales = (ctypes.c_float * len(active))(*[1.0] * len(active))
        if llama_cpp.llama_set_adapters_lora(llm._ctx.ctx, adapters, len(active), scales):
            raise UserError(f"llama.cpp could not apply the adapter {path}; use --engine torch")
        llm.reset()  # what the KV cache holds was computed with the previous adapter
        if self.seed is not None:
            llm.set_seed(self.seed)  # each adapter's answers as from a run of its own
        yield lambda tokenizer, prompts, stops, sampling, live: complete(llm, tokenizer, prompts, stops, sampling,
                                                                         live)


def complete(llm: Any, tokenizer: Tokenizer, prompts: list[list[int]], stop_strings: tuple[str, ...],
             sampling: Any, stream: TextIO | None = None) -> Completion:
    """As generate.complete, one prompt after another: llama.cpp holds one sequence here."""
    stop_ids = stop_ids_for(tokenizer, stop_strings)
    texts, n_generated, stopped = [], 0, []
    for prompt in prompts:
        row = TextStream(tokenizer, stop_ids, stop_strings)
        budget = min(sampling.max_new_tokens, llm.n_ctx() - len(prompt))
        if budget < 1:
            raise UserError(f"the prompt is {len(prompt)} tokens, the model's context is {llm.n_ctx()}; shorten it")
        tokens = llm.generate(prompt, temp=sampling.temperature, top_k=sampling.top_k or 0, top_p=sampling.top_p,
                              min_p=0.0, repeat_penalty=1.0, reset=True)
        for i, token in enumerate(tokens):
            n_generated += 1  # as generate.complete counts them: the token that ends the row included
            piece = row.add(token)
            if stream is not None and piece:
                stream.write(piece)
                stream.flush()
            if row.done or i + 1 >= budget:
                break
        stopped.append(row.done)
        piece = row.finish()
        if stream is not None and piece:
            stream.write(piece)
        texts.append(row.text)
    return Completion(texts, n_generated, stopped)
