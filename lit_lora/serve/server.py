"""`serve` itself: check the options, load the base, start the engine thread and the HTTP server, stop cleanly."""
from __future__ import annotations

import contextlib
import signal
import sys
import threading
from pathlib import Path
from typing import TextIO

from lit_lora.errors import UserError

DEFAULT_CONTEXT = 2048  # tokens per request: each of the max_batch rows holds a key/value cache this long


def run_serve(
    checkpoint_dir: Path, lora_paths: list[str] = (), lora_dir: Path | None = None, host: str = "127.0.0.1",
    port: int = 8000, api_key: str | None = None, max_adapters: int = 8, max_batch: int = 8, max_queue: int = 64,
    max_tokens: int = 512, max_seq_length: int | None = None, precision: str = "auto", device: str = "auto",
    quantize: str | None = None, verify: bool = True, log: TextIO | None = None, ready=None,
) -> None:
    """Serve the base and its adapters over the OpenAI API until SIGTERM or Ctrl-C. `ready`, when given, is
    called with the uvicorn server once it listens (tests stop it through that)."""
    from lit_lora.checkpoint import load_config, load_info
    from lit_lora.device import GENERATE_PRECISIONS, check_precision, resolve_device
    from lit_lora.generate import load_for_generation, longrope_restart
    from lit_lora.prompts.format import prompt_format
    from lit_lora.quantize import decoding_quantize
    from lit_lora.serve.adapters import AdapterSource, ResidentAdapters, parse_lora_path
    from lit_lora.serve.batch import AdapterTable, Rows
    from lit_lora.serve.engine import Engine
    from lit_lora.tokenizer import Tokenizer

    uvicorn = _uvicorn()  # before anything loads: the one line saying how to install it
    from lit_lora.serve.app import Limits, Service, create_app

    log = log or sys.stderr
    check_precision(precision, GENERATE_PRECISIONS)
    where = resolve_device(device)
    for name, value in (("max_adapters", max_adapters), ("max_batch", max_batch), ("max_queue", max_queue),
                        ("max_tokens", max_tokens)):
        if value < 1:
            raise UserError(f"--{name} must be >= 1, got {value}")
    if not 0 < port < 65536:
        raise UserError(f"--port must be in 1..65535, got {port}")
    if lora_dir is not None and not Path(lora_dir).is_dir():
        raise UserError(f"--lora_dir {lora_dir} is not a directory")
    config, tokenizer = load_config(checkpoint_dir), Tokenizer(checkpoint_dir)
    context = min(config.max_seq_len, max_seq_length or DEFAULT_CONTEXT)
    restart = longrope_restart(config)
    if restart is not None and context > restart:  # generate prefills again there; a served batch cannot
        print(f"note: contexts capped at {restart} tokens, where LongRoPE would switch to its long factors",
              file=log)
        context = restart
    if context < 2:
        raise UserError(f"--max_seq_length must be >= 2, got {max_seq_length}")
    source = AdapterSource(Path(checkpoint_dir), config, dict(map(parse_lora_path, lora_paths)),
                           Path(lora_dir) if lora_dir else None, verify)
    for name in source.paths:  # the ones named on the command line must be good now
        source.load(name)
    quantize = decoding_quantize(quantize, [source.metas[n] for n in source.paths], log)
    model = load_for_generation(checkpoint_dir, precision, verify, True, where, quantize)
    rows = Rows()
    table = AdapterTable(model, rows, max_adapters)
    engine = Engine(model, tokenizer, ResidentAdapters(table, source), rows, max_batch, context, max_queue)
    base_meta, formats = load_info(checkpoint_dir), {}

    def format_of(adapter: str | None, multi_turn: bool):
        meta = base_meta if adapter is None else source.metas[adapter]
        key = (adapter, source.checked.get(adapter), multi_turn)  # a changed adapter: its format again
        if key not in formats:
            formats[key] = prompt_format("auto", meta, tokenizer, multi_turn)
        return formats[key]

    base_name = Path(checkpoint_dir).resolve().name
    service = Service(engine, source, tokenizer, base_name, format_of,
                      Limits(context, min(max_tokens, context - 1), max_batch, api_key))
    server = uvicorn.Server(uvicorn.Config(create_app(service), host=host, port=port, log_level="warning",
                                           timeout_graceful_shutdown=30))
    engine.start()
    names = ", ".join(service.models()[1:]) or "none yet"
    print(f"serving {base_name} (adapters: {names}) on http://{host}:{port}/v1 for the OpenAI API; "
          f"{max_batch} requests at a time, contexts of {context} tokens", file=log, flush=True)
    if ready is not None:
        ready(server)
    try:
        with signals_end_quietly():
            server.run()
    finally:
        engine.stop(cancel=True)
    print("stopped", file=log)


@contextlib.contextmanager
def signals_end_quietly():
    """uvicorn shuts down gracefully on SIGINT or SIGTERM and then raises the signal again for the handler it found,
    which by default kills the process (exit 143) or raises KeyboardInterrupt: it finds this no-op instead, so that a
    requested stop exits 0 after the engine stops."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _uvicorn():
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise UserError("serve needs FastAPI and uvicorn: pip install 'lit-lora[serve]'") from None
    return uvicorn

