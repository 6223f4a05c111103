"""Training data: read JSONL / JSON / CSV / Parquet, detect the format, tokenize with response-only labels,
split off a validation set, truncate, pack, and batch (padded to each batch's longest row).

Formats (one record per row):

    alpaca      {"instruction": ..., "input": ... (optional), "output": ...}
    chat        {"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}
    completion  {"prompt": ..., "completion": ...}
    text        {"text": ...}

Loss is on the response only (labels -100 on prompt tokens): alpaca's output, completion's completion, every
assistant turn of a chat. `text` trains on every token. The first label of every example is -100 too: a causal LM
never predicts its first token, and packed rows must not predict one example's start from the previous one.

Prompt templates (documented, stable):

* alpaca: ``### Instruction:\\n{instruction}\\n\\n### Input:\\n{input}\\n\\n### Response:\\n`` (the Input section
  only when `input` is non-empty), then ``{output}`` + EOS.
* chat: the tokenizer's own chat template when it has one; otherwise ``{role}: {content}\\n`` per message, the
  assistant's turn trained from after ``assistant: `` up to and including EOS.
* completion: ``{prompt}`` then ``{completion}`` + EOS (no separator is added: put one in the data).
* seq2seq models (T5): the prompt is the encoder input and the response the target; `text` rows are their own
  target.

Packing (`config.training.packing`, causal LMs): examples are concatenated greedily into rows of at most
`max_seq_length` tokens; position ids restart at 0 for every example and no attention mask is passed, which makes
transformers' mask builder (SDPA, eager, flash) use a block-diagonal causal mask, so packed examples never attend
to one another. Architectures whose attention ignores position ids (absolute learned positions are fine; the mask
is what matters) still get the block mask, since it is built from position ids in the shared masking utilities.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from advisor.errors import AdvisorInputError

FORMATS = ("alpaca", "chat", "completion", "text")
FORMAT_CHOICES = ("auto", *FORMATS)
SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".pq": "parquet"}
REQUIRED = {"alpaca": ("instruction", "output"), "chat": ("messages",), "completion": ("prompt", "completion"),
            "text": ("text",)}
CHAT_ROLES = ("system", "user", "assistant", "tool")
IGNORE = -100
PLAIN_CHAT_PREFIX = "{role}: "


# --------------------------------------------------------------------------------------------- paths
def resolve_data_path(path: str | os.PathLike) -> Path:
    """The real path of a dataset/output under the data root; anything that escapes it (``..``, an absolute path
    elsewhere, a symlink pointing outside) is refused with field ``dataset.path``. Relative paths are relative to
    the data root."""
    from advisor.settings import get_settings

    if path is None or not str(path).strip():
        raise AdvisorInputError("dataset.path", "required: a file under the data root")
    if "\x00" in str(path):
        raise AdvisorInputError("dataset.path", "contains a NUL byte")
    root = Path(get_settings().data_root).expanduser().resolve()
    p = Path(str(path)).expanduser()
    candidate = p if p.is_absolute() else root / p
    real = candidate.resolve()  # follows every symlink on the way
    if real != root and root not in real.parents:
        raise AdvisorInputError("dataset.path", f"{str(path)!r} is outside the data root ({root}); put the file under it")
    return real


def check_readable(path: str | os.PathLike, field_name: str = "dataset.path") -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise AdvisorInputError(field_name, f"file not found: {p}")
    if not p.is_file():
        raise AdvisorInputError(field_name, f"not a file: {p}")
    if file_kind(p) is None:
        raise AdvisorInputError(field_name, f"unsupported file type {p.suffix!r}", allowed=sorted(SUFFIXES))
    try:
        with open(p, "rb") as fh:
            fh.read(1)
    except OSError as err:
        raise AdvisorInputError(field_name, f"cannot read {p}: {err.strerror or err}") from None
    return p.resolve()


def file_kind(path: Path) -> str | None:
    return SUFFIXES.get(Path(path).suffix.lower())


# --------------------------------------------------------------------------------------------- reading
@dataclass
class Row:
    where: str  # "line 7" / "row 3" for error messages
    data: dict


def read_rows(path: str | os.PathLike, limit: int | None = None) -> list[Row]:
    """Records of a JSONL / JSON / CSV / Parquet file, each with its line or row number."""
    p = Path(path)
    kind = file_kind(p)
    name = p.name
    rows: list[Row] = []
    if kind == "jsonl":
        with open(p, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as err:
                    raise AdvisorInputError("dataset.path", f"{name} line {lineno}: not valid JSON ({err.msg})") from None
                if not isinstance(obj, dict):
                    raise AdvisorInputError("dataset.path", f"{name} line {lineno}: expected a JSON object, got "
                                            f"{type(obj).__name__}")
                rows.append(Row(f"line {lineno}", obj))
                if limit and len(rows) >= limit:
                    break
    elif kind == "json":
        try:
            obj = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise AdvisorInputError("dataset.path", f"{name}: not valid JSON ({err.msg} at line {err.lineno})") from None
        if isinstance(obj, dict) and isinstance(obj.get("data"), list):
            obj = obj["data"]
        if not isinstance(obj, list):
            raise AdvisorInputError("dataset.path", f"{name}: expected a JSON array of records (or {{\"data\": [...]}})")
        for i, item in enumerate(obj[:limit] if limit else obj):
            if not isinstance(item, dict):
                raise AdvisorInputError("dataset.path", f"{name} item {i}: expected a JSON object, got {type(item).__name__}")
            rows.append(Row(f"item {i}", item))
    elif kind in ("csv", "parquet"):
        import pandas as pd

        try:
            frame = pd.read_csv(p, nrows=limit, keep_default_na=False) if kind == "csv" else pd.read_parquet(p)
        except Exception as err:  # pandas/pyarrow raise many types for malformed files
            raise AdvisorInputError("dataset.path", f"{name}: cannot read as {kind} ({type(err).__name__}: {err})") from None
        if limit and kind == "parquet":
            frame = frame.head(limit)
        records = frame.to_dict(orient="records")
        for i, rec in enumerate(records):
            # CSV: header is line 1, so data row i is on line i + 2
            where = f"line {i + 2}" if kind == "csv" else f"row {i}"
            rows.append(Row(where, {str(k): _plain(v) for k, v in rec.items()}))
    else:
        raise AdvisorInputError("dataset.path", f"unsupported file type {p.suffix!r}", allowed=sorted(SUFFIXES))
    if not rows:
        raise AdvisorInputError("dataset.path", f"{name} holds no records")
    return rows


def _plain(value: Any) -> Any:
    """pandas/pyarrow cells → plain Python (numpy arrays of message dicts in Parquet, NaN → None, JSON strings)."""
    try:
        import numpy as np

        if isinstance(value, np.ndarray):
            return [_plain(v) for v in value.tolist()]
        if isinstance(value, np.generic):
            value = value.item()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    return value


def detect_format(row: Row, name: str = "dataset") -> str:
    keys = set(row.data)
    if "messages" in keys:
        return "chat"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    if {"prompt", "completion"} <= keys:
        return "completion"
    if "text" in keys:
        return "text"
    raise AdvisorInputError(
        "dataset.format",
        f"{name} {row.where}: cannot tell the format from the fields {sorted(keys)}; expected one of: "
        "messages (chat), instruction+output (alpaca), prompt+completion (completion), text (text)",
        allowed=list(FORMAT_CHOICES),
    )


def peek_format(path: str | os.PathLike, fmt: str = "auto") -> str:
    """Detect (or check) the format from the first record — cheap enough for request validation."""
    if fmt not in FORMAT_CHOICES:
        raise AdvisorInputError("dataset.format", f"unknown format {fmt!r}", allowed=list(FORMAT_CHOICES))
    first = read_rows(path, limit=1)[0]
    if fmt == "auto":
        return detect_format(first, Path(path).name)
    validate_row(first, fmt, Path(path).name)
    return fmt


def _text(row: Row, key: str, fmt: str, name: str, required: bool = True) -> str:
    value = row.data.get(key)
    if value is None:
        if required:
            raise AdvisorInputError(
                f"dataset.rows.{key}",
                f"{name} {row.where}: field {key!r} is missing ({fmt} rows need {', '.join(REQUIRED[fmt])})",
            )
        return ""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise AdvisorInputError(f"dataset.rows.{key}", f"{name} {row.where}: field {key!r} must be a string, got "
                                f"{type(value).__name__}")
    return value


def _messages(row: Row, name: str) -> list[dict]:
    msgs = row.data.get("messages")
    if isinstance(msgs, str):  # CSV cells hold JSON text
        try:
            msgs = json.loads(msgs)
        except json.JSONDecodeError:
            raise AdvisorInputError("dataset.rows.messages", f"{name} {row.where}: 'messages' is a string but not JSON") from None
    if not isinstance(msgs, list) or not msgs:
        raise AdvisorInputError("dataset.rows.messages", f"{name} {row.where}: 'messages' must be a non-empty list of "
                                "{role, content} objects")
    out = []
    for j, m in enumerate(msgs):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise AdvisorInputError("dataset.rows.messages", f"{name} {row.where}: messages[{j}] needs 'role' and 'content'")
        if m["role"] not in CHAT_ROLES:
            raise AdvisorInputError("dataset.rows.messages", f"{name} {row.where}: messages[{j}].role {m['role']!r} is "
                                    "not a known role", allowed=list(CHAT_ROLES))
        if not isinstance(m["content"], str):
            raise AdvisorInputError("dataset.rows.messages", f"{name} {row.where}: messages[{j}].content must be a string")
        out.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "assistant" for m in out):
        raise AdvisorInputError("dataset.rows.messages", f"{name} {row.where}: no assistant message to learn from")
    return out


def validate_row(row: Row, fmt: str, name: str) -> None:
    if fmt == "chat":
        _messages(row, name)
        return
    for key in REQUIRED[fmt]:
        _text(row, key, fmt, name)


# --------------------------------------------------------------------------------------------- tokenizing
@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # causal: same length as input_ids; seq2seq: the target ids


@dataclass
class TrainData:
    train: list[Example]
    val: list[Example]
    format: str
    kind: str
    truncated: int = 0
    dropped: int = 0  # examples left with no trainable token after truncation
    packed: bool = False
    notes: list[str] = field(default_factory=list)
    num_examples: int = 0  # training examples before packing

    def token_stats(self) -> dict:
        lengths = [len(e.input_ids) for e in self.train] or [0]
        return {"num_examples": len(self.train), "avg_tokens": sum(lengths) / len(lengths), "max_tokens": max(lengths)}


def _ids(tokenizer, text: str, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"]) if text else []


def _alpaca_prompt(instruction: str, inp: str) -> str:
    if inp.strip():
        return f"### Instruction:\n{instruction}\n\n### Input:\n{inp}\n\n### Response:\n"
    return f"### Instruction:\n{instruction}\n\n### Response:\n"


def _chat_segments(tokenizer, messages: list[dict]) -> list[tuple[str, bool]]:
    """(text, trained) pieces that concatenate to the rendered conversation."""
    template = getattr(tokenizer, "chat_template", None)
    if template:
        def render(msgs, gen=False):
            return tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)

        segments: list[tuple[str, bool]] = []
        prev = ""
        for i, m in enumerate(messages):
            full = render(messages[: i + 1])
            if m["role"] == "assistant":
                head = render(messages[:i], gen=True) if i else render([], gen=True) if _renders_empty(tokenizer) else ""
                if head.startswith(prev) and full.startswith(head):
                    segments += [(head[len(prev):], False), (full[len(head):], True)]
                    prev = full
                    continue
            if not full.startswith(prev):  # template is not prefix-stable: fall back to the plain template
                return _plain_chat_segments(tokenizer, messages)
            segments.append((full[len(prev):], False))
            prev = full
        return segments
    return _plain_chat_segments(tokenizer, messages)


def _renders_empty(tokenizer) -> bool:
    try:
        tokenizer.apply_chat_template([], tokenize=False, add_generation_prompt=True)
        return True
    except Exception:  # templates that index messages[0]
        return False


def _plain_chat_segments(tokenizer, messages: list[dict]) -> list[tuple[str, bool]]:
    eos = tokenizer.eos_token or ""
    out = []
    for m in messages:
        prefix = PLAIN_CHAT_PREFIX.format(role=m["role"])
        if m["role"] == "assistant":
            out += [(prefix, False), (m["content"] + eos + "\n", True)]
        else:
            out.append((f"{prefix}{m['content']}\n", False))
    return out


def encode_row(row: Row, fmt: str, tokenizer, kind: str, name: str = "dataset") -> Example:
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if fmt == "chat":
        messages = _messages(row, name)
        if kind == "seq2seq":
            last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
            prompt = "".join(t for t, _ in _plain_chat_segments(tokenizer, messages[:last]))
            prompt += PLAIN_CHAT_PREFIX.format(role="assistant")
            return Example(_ids(tokenizer, prompt, True), _ids(tokenizer, messages[last]["content"], False) + eos)
        ids: list[int] = []
        labels: list[int] = []
        for text, trained in _chat_segments(tokenizer, messages):
            piece = _ids(tokenizer, text, False)
            ids += piece
            labels += piece if trained else [IGNORE] * len(piece)
        return Example(ids, _first_ignored(labels))
    if fmt == "alpaca":
        prompt = _alpaca_prompt(_text(row, "instruction", fmt, name), _text(row, "input", fmt, name, required=False))
        response = _text(row, "output", fmt, name)
    elif fmt == "completion":
        prompt, response = _text(row, "prompt", fmt, name), _text(row, "completion", fmt, name)
    else:
        text = _text(row, "text", fmt, name)
        if kind == "seq2seq":
            return Example(_ids(tokenizer, text, True), _ids(tokenizer, text, False) + eos)
        ids = _ids(tokenizer, text, True) + eos
        return Example(ids, _first_ignored(list(ids)))
    p_ids, r_ids = _ids(tokenizer, prompt, True), _ids(tokenizer, response, False) + eos
    if kind == "seq2seq":
        return Example(p_ids, r_ids)
    return Example(p_ids + r_ids, _first_ignored([IGNORE] * len(p_ids) + r_ids))


def _first_ignored(labels: list[int]) -> list[int]:
    if labels:
        labels[0] = IGNORE
    return labels


def split_indices(n: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Seeded train/validation split: at least one validation example when n >= 2 and fraction > 0."""
    if fraction <= 0 or n < 2:
        return list(range(n)), []
    n_val = min(n - 1, max(1, round(n * fraction)))
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    val = sorted(perm[:n_val])
    chosen = set(val)
    return [i for i in range(n) if i not in chosen], val


def load_dataset(
    path: str | os.PathLike,
    fmt: str,
    tokenizer,
    *,
    kind: str,
    max_seq_length: int,
    validation_split: float = 0.1,
    seed: int = 42,
    packing: bool = False,
    fixed_rows: bool = False,
    max_target_length: int | None = None,
) -> TrainData:
    """Read, validate, tokenize, split and truncate; pack the training split when asked (causal LMs). Seq2seq
    targets are truncated to `max_target_length` (default: max_seq_length)."""
    target_max = (max_target_length or max_seq_length) if kind == "seq2seq" else max_seq_length
    rows = read_rows(path)
    name = Path(path).name
    fmt = detect_format(rows[0], name) if fmt == "auto" else fmt
    examples = [encode_row(r, fmt, tokenizer, kind, name) for r in rows]
    train_idx, val_idx = split_indices(len(examples), validation_split, seed)
    truncated = dropped = 0
    kept_train, kept_val = [], []
    for bucket, idx in ((kept_train, train_idx), (kept_val, val_idx)):
        for i in idx:
            ex = examples[i]
            cut = len(ex.input_ids) > max_seq_length or (kind == "seq2seq" and len(ex.labels) > target_max)
            if cut:
                truncated += 1
                ex = Example(ex.input_ids[:max_seq_length],
                             ex.labels[:target_max] if kind == "seq2seq" else ex.labels[:max_seq_length])
            if not any(t != IGNORE for t in ex.labels) or not ex.input_ids:
                dropped += 1
                continue
            bucket.append(ex)
    if not kept_train:
        raise AdvisorInputError("dataset.path", f"{name}: no training example has a response token left after truncation "
                                f"to max_seq_length={max_seq_length}")
    data = TrainData(kept_train, kept_val, fmt, kind, truncated, dropped, num_examples=len(kept_train))
    if truncated:
        data.notes.append(f"{truncated} example(s) truncated to max_seq_length={max_seq_length}"
                          + (f" / max_target_length={target_max}" if kind == "seq2seq" and target_max != max_seq_length
                             else ""))
    if dropped:
        data.notes.append(f"{dropped} example(s) dropped: no response token left after truncation")
    if fixed_rows and kind != "seq2seq":
        data.train = stream_rows(data.train, max_seq_length)
        data.packed = True
        data.notes.append(f"examples concatenated into rows of exactly {max_seq_length} tokens (LongLoRA's long-"
                          "document recipe: no padding, so shifted sparse attention applies to every row)")
    elif packing:
        if kind == "seq2seq":
            data.notes.append("packing is for causal LMs; seq2seq examples are batched unpacked")
        else:
            data.train = pack_examples(data.train, max_seq_length)
            data.packed = True
    return data


# --------------------------------------------------------------------------------------------- packing + batches
@dataclass
class Packed:
    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]
    num_examples: int


def pack_examples(examples: list[Example], max_len: int) -> list[Packed]:
    """Greedy first-fit in data order into rows of <= max_len tokens, position ids restarting per example."""
    rows: list[Packed] = []
    cur = Packed([], [], [], 0)
    for ex in examples:
        if cur.input_ids and len(cur.input_ids) + len(ex.input_ids) > max_len:
            rows.append(cur)
            cur = Packed([], [], [], 0)
        cur.input_ids += ex.input_ids
        cur.labels += ex.labels  # each example's first label is already IGNORE
        cur.position_ids += list(range(len(ex.input_ids)))
        cur.num_examples += 1
    if cur.input_ids:
        rows.append(cur)
    return rows


def stream_rows(examples: list[Example], length: int) -> list[Example]:
    """Concatenate all examples and cut the stream into rows of exactly `length` tokens (the tail shorter than a
    row is dropped when at least one full row exists). Examples may share a row and attend to each other, as in
    LongLoRA's training on concatenated long documents; each example's first label stays ignored."""
    ids = [t for e in examples for t in e.input_ids]
    labels = [t for e in examples for t in e.labels]
    if len(ids) < length:
        return [Example(ids, labels)]
    rows = [Example(ids[i:i + length], labels[i:i + length]) for i in range(0, len(ids) - length + 1, length)]
    rows = [r for r in rows if any(t != IGNORE for t in r.labels[1:])]
    for r in rows:
        r.labels[0] = IGNORE
    return rows or [Example(ids[:length], labels[:length])]


def collate(items: list, pad_id: int, kind: str) -> dict[str, torch.Tensor]:
    """Pad to the longest row of this batch (not to max length). Packed rows get position ids and no mask."""
    if kind == "seq2seq":
        n_in = max(len(e.input_ids) for e in items)
        n_out = max(len(e.labels) for e in items)
        ids = torch.full((len(items), n_in), pad_id, dtype=torch.long)
        mask = torch.zeros((len(items), n_in), dtype=torch.long)
        labels = torch.full((len(items), n_out), IGNORE, dtype=torch.long)
        for i, e in enumerate(items):
            ids[i, : len(e.input_ids)] = torch.tensor(e.input_ids)
            mask[i, : len(e.input_ids)] = 1
            labels[i, : len(e.labels)] = torch.tensor(e.labels)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
    n = max(len(e.input_ids) for e in items)
    ids = torch.full((len(items), n), pad_id, dtype=torch.long)
    labels = torch.full((len(items), n), IGNORE, dtype=torch.long)
    if isinstance(items[0], Packed):
        pos = torch.zeros((len(items), n), dtype=torch.long)
        for i, e in enumerate(items):
            k = len(e.input_ids)
            ids[i, :k] = torch.tensor(e.input_ids)
            labels[i, :k] = torch.tensor(e.labels)
            pos[i, :k] = torch.tensor(e.position_ids)
            pos[i, k:] = torch.arange(n - k)  # padding forms its own block; its labels are ignored
        # use_cache=False: a KV cache built during the forward makes transformers skip packed-sequence detection
        return {"input_ids": ids, "labels": labels, "position_ids": pos, "use_cache": False}
    mask = torch.zeros((len(items), n), dtype=torch.long)
    for i, e in enumerate(items):
        k = len(e.input_ids)
        ids[i, :k] = torch.tensor(e.input_ids)
        labels[i, :k] = torch.tensor(e.labels)
        mask[i, :k] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def real_tokens(items: list) -> int:
    """Tokens that are not padding (input side): the unit of tokens/s."""
    return sum(len(e.input_ids) for e in items)


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def label_tokens(batch: dict[str, torch.Tensor]) -> int:
    return int((batch["labels"] != IGNORE).sum())
