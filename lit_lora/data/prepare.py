"""Turn an instruction file into a prepared directory: template, tokenise, truncate, split, write.

Each example is tokenised as two pieces, prompt (with BOS if the tokenizer wants one) and response, then
EOS is appended. Keeping the pieces apart gives the exact prompt length for masking, and the response
tokens decode to exactly the response text. The output depends only on the inputs and the seed, so two
runs write byte-identical files. Conversations take the same path from `Example`s on (see data/conversations.py).
"""
from __future__ import annotations

import contextlib
import itertools
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Iterator, NamedTuple

import numpy as np
from safetensors.numpy import save_file
from tqdm import tqdm

from lit_lora.checkpoint import check_checkpoint_dir
from lit_lora.data.dataset import DATA_FORMAT_VERSION, META, split_path
from lit_lora.data.readers import Record, is_placeholder_input, read_records
from lit_lora.errors import UserError
from lit_lora.fileio import atomic_dir, check_destination, sha256_file, write_json
from lit_lora.prompts.builtin import instruction_template
from lit_lora.tokenizer import Tokenizer

# Where prepare-alpaca and prepare-dolly fetch their data when given neither --data_file nor --url.
DEFAULT_URLS = {
    "alpaca": "https://raw.githubusercontent.com/tloen/alpaca-lora/main/alpaca_data_cleaned_archive.json",
    "dolly": "https://huggingface.co/datasets/databricks/databricks-dolly-15k/resolve/main/databricks-dolly-15k.jsonl",
}
DEFAULT_VAL_SIZE = 2000  # alpaca-lora's choice
TOKENIZE_BATCH = 4096  # records per encode_batch call: large enough for the Rust backend's threads
EOS_LOSS_WARNING = 0.01  # warn when more than this fraction of the records lose their EOS


@contextlib.contextmanager
def local_copy(data_file: Path | None, url: str | None) -> Iterator[tuple[Path, str]]:
    """(a readable path, the source name to record): the file itself, or `url` downloaded to a temp file."""
    if data_file is not None:
        yield Path(data_file), str(data_file)
        return
    if url is None:
        raise UserError("pass --data_file PATH (or --url URL)")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / (Path(urllib.parse.urlparse(url).path).name or "data.json")
        print(f"downloading {url}")
        try:
            urllib.request.urlretrieve(url, path)
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise UserError(f"cannot download {url}: {getattr(e, 'reason', e)}; "
                            f"download it yourself and pass --data_file") from None
        yield path, url


def tokenize(tokenizer: Tokenizer, texts: list[str], desc: str) -> list[list[int]]:
    """Token ids of many texts, in batches, with a progress bar when the work is long enough to watch."""
    ids: list[list[int]] = []
    with tqdm(total=len(texts), desc=desc, unit="rec", disable=len(texts) < 2 * TOKENIZE_BATCH) as bar:
        for start in range(0, len(texts), TOKENIZE_BATCH):
            ids.extend(tokenizer.encode_batch(texts[start:start + TOKENIZE_BATCH]))
            bar.update(min(TOKENIZE_BATCH, len(texts) - start))
    return ids


class Example(NamedTuple):
    ids: list[int]
    targets: list[bool]  # per token: a loss target
    prompt_length: int  # the tokens evaluate gives the model; the rest is the reference answer


def build_examples(
    prompts: list[list[int]], responses: list[list[int]], bos: list[int], eos: int, max_seq_length: int,
    mask_inputs: bool = True,
) -> tuple[list[Example], list[int], dict[str, int], list[int]]:
    """The kept examples, untruncated length per record, truncation counts, and the index of the record each
    kept example comes from.

    A response that does not fit is cut and keeps its EOS, so the model still learns to stop. A prompt that
    leaves no room for a single response token plus EOS has nothing left to learn from: it is dropped
    (and counted as having lost its EOS).
    """
    examples, full_lengths, kept = [], [], []
    truncated = dropped = 0
    for i, (prompt, response) in enumerate(zip(prompts, responses)):
        prompt = bos + prompt
        full_lengths.append(len(prompt) + len(response) + 1)
        room = max_seq_length - len(prompt) - 1  # response tokens that fit before EOS
        if room < 1:
            dropped += 1
            continue
        if len(response) > room:
            response = response[:room]
            truncated += 1
        examples.append(Example(prompt + response + [eos], [not mask_inputs] * len(prompt) + [True] * (len(response) + 1),
                                len(prompt)))
        kept.append(i)
    return examples, full_lengths, {"truncated": truncated, "prompt_too_long": dropped}, kept


def check_split_options(val_size: int | None, val_fraction: float | None) -> None:
    """What can be refused before the work; whether val_size leaves training examples is known only after it."""
    if val_size is not None and val_fraction is not None:
        raise UserError("pass either --val_size or --val_fraction, not both")
    if val_fraction is not None and not 0 <= val_fraction < 1:
        raise UserError(f"--val_fraction {val_fraction} must be at least 0 and below 1")
    if val_size is not None and val_size < 0:
        raise UserError(f"--val_size {val_size} must be 0 or more")


def split_indices(n: int, val_size: int | None, val_fraction: float | None, seed: int,
                  groups: list[int] | None = None) -> dict[str, np.ndarray]:
    """Random train/val split fixed by `seed`; each split keeps the file's order.

    Examples with the same `groups` value (copies of one record) land in the same split: the groups are
    shuffled and go to val while they fit in val_size (which may then hold a few fewer examples). Without
    repeated groups this is the plain shuffle of the examples, so data without duplicates splits as it always did.
    """
    check_split_options(val_size, val_fraction)
    if val_fraction is not None:
        val_size = round(n * val_fraction)
    elif val_size is None:
        val_size = DEFAULT_VAL_SIZE
    if val_size >= n:
        raise UserError(f"--val_size {val_size} leaves no training examples out of {n}; "
                        f"pass a smaller --val_size or a --val_fraction")
    ids: dict[int, int] = {}
    members: list[list[int]] = []
    for i, group in enumerate(range(n) if groups is None else groups):
        if ids.setdefault(group, len(ids)) == len(members):
            members.append([])
        members[ids[group]].append(i)
    order = np.random.default_rng(seed).permutation(len(members))
    val, room = [], val_size
    for g in order:
        if room == 0:
            break
        if len(members[g]) <= room:
            val += members[g]
            room -= len(members[g])
    val = np.sort(np.array(val, dtype=np.int64))
    return {"train": np.setdiff1d(np.arange(n, dtype=np.int64), val), "val": val}


def write_split(path: Path, examples: list[Example], indices: np.ndarray) -> int:
    chosen = [examples[i] for i in indices]
    offsets = np.zeros(len(chosen) + 1, dtype=np.int64)
    np.cumsum([len(e.ids) for e in chosen], out=offsets[1:])
    total = int(offsets[-1])
    tensors = {
        "tokens": np.fromiter(itertools.chain.from_iterable(e.ids for e in chosen), dtype=np.int32, count=total),
        "targets": np.fromiter(itertools.chain.from_iterable(e.targets for e in chosen), dtype=np.uint8, count=total),
        "offsets": offsets,
        "prompt_lengths": np.array([e.prompt_length for e in chosen], dtype=np.int32),
    }
    # One metadata key only: safetensors writes several in hash-map order, which differs from run to run.
    save_file(tensors, str(path), metadata={"format": f"lit-lora-data-v{DATA_FORMAT_VERSION}"})
    return int(offsets[-1])


def length_stats(lengths: list[int]) -> dict[str, int]:
    a = np.array(lengths)
    return {"min": int(a.min()), "median": int(np.median(a)), "p95": int(np.percentile(a, 95)), "max": int(a.max())}


def clean(records: list[Record]) -> tuple[list[Record], dict[str, int]]:
    """Placeholder inputs ("<noinput>" and its spellings) become empty; records with no output are dropped:
    they would teach the model to answer with nothing but EOS."""
    kept, placeholders, empty = [], 0, 0
    for r in records:
        if not r.output.strip():
            empty += 1
            continue
        if is_placeholder_input(r.input):
            placeholders += 1
            r = Record(r.instruction, "", r.output)
        kept.append(r)
    return kept, {"empty_output": empty, "placeholder_input": placeholders}


def identical_groups(keys: list[Any]) -> tuple[list[int], int]:
    """(for each item the index of the first item with the same key, how many items repeat an earlier one)."""
    first: dict[Any, int] = {}
    groups = [first.setdefault(key, i) for i, key in enumerate(keys)]
    return groups, len(keys) - len(first)


def prepare(
    checkpoint_dir: Path,
    destination: Path,
    data_file: Path | None = None,
    url: str | None = None,
    val_file: Path | None = None,
    format: str = "auto",
    field_map: dict[str, str] | None = None,
    template: str = "alpaca",
    val_size: int | None = None,
    val_fraction: float | None = None,
    max_seq_length: int = 512,
    mask_inputs: bool = True,
    seed: int = 42,
    overwrite: bool = False,
    data_name: str | None = None,
) -> dict[str, Any]:
    """Prepare `data_file` (or `url`) into `destination`; returns the meta.json written there. The validation
    split is drawn at random (val_size or val_fraction), or is every record of `val_file`. `data_name` names the
    data in meta.json instead of the file paths (for data generated into temporary files). An existing
    `destination` is replaced only with `overwrite`, and only if it is ours (see fileio.check_destination)."""
    inputs = [checkpoint_dir, data_file, val_file]
    check_destination(destination, overwrite, inputs, "--destination")  # before the work
    prompt_template = instruction_template(template)
    tokenizer = Tokenizer(check_checkpoint_dir(checkpoint_dir))
    prompt_template.check_tokens(tokenizer)
    if tokenizer.eos_id is None:
        raise UserError(f"the tokenizer of {checkpoint_dir} has no EOS token; cannot mark where responses end")
    if data_file is not None and url is not None:
        raise UserError("pass either --data_file or --url, not both")
    if val_file is not None and (val_size is not None or val_fraction is not None):
        raise UserError("pass either --val_file or --val_size/--val_fraction, not both")
    check_split_options(val_size, val_fraction)
    with local_copy(data_file, url or DEFAULT_URLS.get(format)) as (path, source_name):
        records, fields = read_records(path, format, field_map)
        source_name = data_name or source_name
        source = {"path": source_name, "sha256": sha256_file(path), "fields": fields}
    val_records = []
    if val_file is not None:
        val_records, _ = read_records(val_file, format, field_map)
        source["val_file"] = {"path": data_name or str(val_file), "sha256": sha256_file(val_file)}

    n_records = len(records) + len(val_records)
    records, cleaned = clean(records)
    if not records:
        raise UserError(f"{source_name}: every record has an empty output; nothing to train on")
    n_train_records = len(records)
    if val_file is not None:
        val_records, val_cleaned = clean(val_records)
        cleaned = {key: cleaned[key] + val_cleaned[key] for key in cleaned}
        records += val_records
    prompts = tokenize(tokenizer, [prompt_template.single_turn.prompt(r.instruction, r.input) for r in records], "prompts")
    responses = tokenize(tokenizer, [r.output for r in records], "responses")
    bos = [tokenizer.bos_id] if tokenizer.add_bos else []
    examples, full_lengths, cut, kept = build_examples(prompts, responses, bos, tokenizer.eos_id, max_seq_length,
                                                       mask_inputs)
    if not examples:
        shortest = min(len(bos) + len(p) for p in prompts)
        raise UserError(f"--max_seq_length {max_seq_length} is too small for any prompt: the shortest prompt "
                        f"is {shortest} tokens, and a response needs at least 2 more")
    # Identical: the same instruction, input and output after `clean`.
    groups, duplicates = identical_groups([(r.instruction, r.input, r.output) for r in records])
    if val_file is None:
        splits = split_indices(len(examples), val_size, val_fraction, seed, [groups[i] for i in kept])
    else:  # the file's own split, in file order
        in_val = np.array([i >= n_train_records for i in kept])
        splits = {"train": np.flatnonzero(~in_val), "val": np.flatnonzero(in_val)}
        if not len(splits["train"]):
            raise UserError(f"no training example is left from {source_name} (all dropped); check --max_seq_length")

    meta = {
        "format_version": DATA_FORMAT_VERSION,
        "template": prompt_template.name,
        "tokenizer": tokenizer.identity(),
        "mask_inputs": mask_inputs,
        "max_seq_length": max_seq_length,
        "seed": seed,
        "source": source,
        "counts": {"records": n_records, **cleaned, "duplicates": duplicates, **cut,
                   "examples": len(examples), "train": len(splits["train"]), "val": len(splits["val"])},
        "lengths_before_truncation": length_stats(full_lengths),
    }
    return write_prepared(destination, overwrite, inputs, examples, splits, meta)


def write_prepared(destination: Path, overwrite: bool, inputs: list, examples: list[Example],
                   splits: dict[str, np.ndarray], meta: dict[str, Any]) -> dict[str, Any]:
    """Write the splits and meta.json into `destination` at once (atomic_dir); returns meta with token counts."""
    with atomic_dir(destination, overwrite, inputs, "--destination") as tmp:
        meta["tokens"] = {split: write_split(split_path(tmp, split), examples, indices)
                          for split, indices in splits.items()}
        write_json(tmp / META, meta)
    return meta


def lengths_line(s: dict[str, int]) -> str:
    return f"token lengths before truncation: min {s['min']}, median {s['median']}, p95 {s['p95']}, max {s['max']}"


def summary(meta: dict[str, Any], destination: Path) -> tuple[list[str], list[str]]:
    """(lines to print, warnings) describing a prepare run."""
    c, s = meta["counts"], meta["lengths_before_truncation"]
    lines = [
        f"read {c['records']} records from {meta['source']['path']}: {c['examples']} examples "
        f"({c['train']} train, {c['val']} val) written to {destination}",
        lengths_line(s),
        f"truncated to --max_seq_length {meta['max_seq_length']}: {c['truncated']} (response cut, EOS kept), "
        f"{c['prompt_too_long']} dropped (prompt alone too long, EOS lost)",
        f"dropped {c['empty_output']} with an empty output; {c['placeholder_input']} placeholder inputs "
        f"(like <noinput>) treated as no input",
    ]
    warnings = []
    if c.get("duplicates"):
        warnings.append(f"{c['duplicates']} of {c['records']} records repeat an earlier record (same instruction, "
                        f"input and output); they are kept, and all copies of a record are in the same split")
    if c["prompt_too_long"] > EOS_LOSS_WARNING * c["records"]:
        warnings.append(f"{c['prompt_too_long']} of {c['records']} records lost their EOS (and were dropped): "
                        f"their prompt leaves no room for a response within --max_seq_length "
                        f"{meta['max_seq_length']}; consider raising it")
    return lines, warnings
