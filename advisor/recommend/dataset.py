"""Profile a training file for the recommender: rows, and the token length of every example.

The recommender needs three numbers from a dataset — how many examples, their mean length and the length of the
*longest* (the longest batch sets the memory peak) — plus a sense of the distribution (p50/p90/p99). Given a
path instead of counts, this module reads the file with the trainer's reader (`advisor.train.data`: JSONL, JSON,
CSV or Parquet; alpaca, chat, completion or text rows, detected from the first row) and counts tokens:

- with the model's own tokenizer when one is available offline (a local model directory with tokenizer files, or a
  Hub id already in the local Hugging Face cache): exact counts of what the trainer will feed — each row encoded by
  the trainer's own `advisor.train.data.encode_row` (prompt template or chat template, end of sequence);
- otherwise with a documented approximation, ``ceil(characters / 4)`` per text field plus 4 tokens per chat message
  for role markers (OpenAI's "a token is about 4 characters of English" rule of thumb; Llama/Mistral tokenizers
  give 3.5-4.2 characters per token on English prose, so it errs slightly long, the safe side for memory).

The answer says which one was used (`tokenizer`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from advisor.errors import AdvisorInputError

FORMATS = ("alpaca", "chat", "completion", "text")
CHARS_PER_TOKEN = 4.0
CHAT_MESSAGE_OVERHEAD_TOKENS = 4
MAX_PROFILE_ROWS = 200_000  # beyond this the lengths are a uniform sample of the rows (the count stays exact)


def _messages(row: dict[str, Any]) -> list[dict[str, str]]:
    msgs = row.get("messages") or []
    out = []
    for m in msgs if isinstance(msgs, list) else []:
        if isinstance(m, dict):
            role = m.get("role") or m.get("from") or "user"
            out.append({"role": str(role), "content": str(m.get("content", m.get("value", "")) or "")})
    return out


def example_texts(row: dict[str, Any], fmt: str) -> list[str]:
    """The text fields of one example, in training order."""
    if fmt == "alpaca":
        return [str(row.get(k) or "") for k in ("instruction", "input", "output")]
    if fmt == "completion":
        return [str(row.get("prompt") or ""), str(row.get("completion") or "")]
    if fmt == "text":
        return [str(row.get("text") or "")]
    return [m["content"] for m in _messages(row)]


def _approx_tokens(row: dict[str, Any], fmt: str) -> int:
    n = sum(math.ceil(len(t) / CHARS_PER_TOKEN) for t in example_texts(row, fmt))
    if fmt == "chat":
        n += CHAT_MESSAGE_OVERHEAD_TOKENS * len(_messages(row))
    return max(1, n + 1)  # + end of sequence


def _load_tokenizer(resolved) -> tuple[Any | None, str]:
    """The model's tokenizer if it can be had without a network, else (None, why)."""
    candidates = []
    if getattr(resolved, "origin", None) == "local" and resolved.path:
        candidates.append(str(resolved.path))
    if getattr(resolved, "origin", None) in ("catalog", "hub") and resolved.id:
        candidates.append(str(resolved.id))  # only if already in the local Hugging Face cache
    try:
        from transformers import AutoTokenizer
    except ImportError:  # pragma: no cover - transformers is a dependency
        return None, "transformers not importable"
    for cand in candidates:
        try:
            return AutoTokenizer.from_pretrained(cand, local_files_only=True), cand
        except Exception:  # noqa: BLE001 - no tokenizer files here / not in the local cache
            continue
    return None, "no tokenizer available offline"


def _exact_tokens(tok, rows, fmt: str, kind: str) -> tuple[list[int], list[int]]:
    """Tokens of each example exactly as the trainer encodes it (advisor.train.data.encode_row: prompt template or
    chat template, end of sequence), and for encoder-decoders the targets apart: (lengths, target lengths), where an
    encoder-decoder's length is the longer of its source and target (the target sets the decoder's length)."""
    from advisor.train.data import encode_row

    examples = [encode_row(r, fmt, tok, kind) for r in rows]
    if kind != "seq2seq":
        return [len(ex.input_ids) for ex in examples], []
    return [max(len(ex.input_ids), len(ex.labels)) for ex in examples], [len(ex.labels) for ex in examples]


def profile_dataset(path: str | Path, resolved_model=None, fmt: str = "auto") -> dict[str, Any]:
    """Rows, detected format and token-length distribution of a training file."""
    from advisor.train.data import FORMAT_CHOICES, check_readable, detect_format, read_rows

    p = check_readable(Path(path).expanduser())
    rows = read_rows(p)
    if not rows:
        raise AdvisorInputError("dataset.path", f"{p.name} holds no examples")
    fmt = (fmt or "auto").strip().lower()
    if fmt == "auto":
        fmt = detect_format(rows[0], p.name)
    elif fmt not in FORMATS:
        raise AdvisorInputError("dataset.format", f"unknown format {fmt!r}", allowed=list(FORMAT_CHOICES))
    sample = rows
    if len(rows) > MAX_PROFILE_ROWS:
        step = len(rows) / MAX_PROFILE_ROWS
        sample = [rows[int(i * step)] for i in range(MAX_PROFILE_ROWS)]
    tok, tok_source = (None, "no model given") if resolved_model is None else _load_tokenizer(resolved_model)
    targets: list[int] = []
    if tok is not None:
        lengths, targets = _exact_tokens(tok, sample, fmt, resolved_model.kind)
        how = f"the model's tokenizer ({tok_source})"
    else:
        lengths = [_approx_tokens(r.data, fmt) for r in sample]
        how = (f"approximation: ceil(characters / {CHARS_PER_TOKEN:g}) per field"
               f"{f' + {CHAT_MESSAGE_OVERHEAD_TOKENS} per chat message' if fmt == 'chat' else ''} + 1 "
               f"({tok_source})")
    ordered = sorted(lengths)

    def pct(q: float) -> int:
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]

    out = {
        "path": str(p), "format": fmt, "num_examples": len(rows), "profiled_rows": len(sample),
        "avg_tokens": round(sum(lengths) / len(lengths), 1), "max_tokens": ordered[-1], "min_tokens": ordered[0],
        "p50_tokens": pct(0.5), "p90_tokens": pct(0.9), "p99_tokens": pct(0.99),
        "total_tokens": int(round(sum(lengths) * len(rows) / len(sample))), "tokenizer": how,
    }
    if targets:  # encoder-decoders: the longest target sets the decoder's length (max_target_length)
        out["max_target_tokens"] = max(targets)
        out["avg_target_tokens"] = round(sum(targets) / len(targets), 1)
    return out
