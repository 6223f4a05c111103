"""The estimator against published measured peak memory (`/work/shared/anchors/public_measurements.csv`).

Every row is mapped to an `EstimateRequest` by fixed rules (below), never tuned per row; rows whose method the
advisor does not model are listed as skipped with the reason. Measured values are decimal GB in the file and are
converted to GiB (× 1e9 / 2**30). For each row the fast estimator's prediction (GPU of the row, so the CUDA profile's
overhead of 0.5 GiB + 5 % is included) and the naive rule "weights × 4" (published params × 2 bytes × 4) are
compared with the measurement:

    error % = (predicted − measured) / measured × 100

A few rows are also simulated exactly (`exact_estimate`) to cross-check the fast estimator (`--exact-rows`).

Mapping rules
-------------
- Models. `Llama-3.2-3B` → catalog `meta-llama/Llama-3.2-3B`; `llama3-8b-instruct` → catalog
  `meta-llama/Meta-Llama-3-8B` (the instruct model has the base model's architecture); `qwen-7b-chat` → catalog
  `Qwen/Qwen-7B` (Qwen-1, remote code, stored as the Qwen2 block it is: biased q/k/v, SwiGLU at half the config's
  `intermediate_size`), `yi-34b-chat` → `01-ai/Yi-34B`: the names resolve as any user's would (`resolve_model`:
  chat/instruct variants use their base entry). The parameter count computed from each shape is checked against the
  row's `params_b` (reported in the JSON).
- Methods (first matching rule; the method's defaults for everything the string does not say):
  `lora rN (c_attn)` → lora r=N on q_proj, k_proj, v_proj (Qwen-1's fused qkv, split as in Qwen2);
  `lora rN` (no targets: the source's default, PEFT's q/v for the MetaMathQA rows, else ms-swift's default for
  Llama-type models such as Yi, q/k/v) → the same; `lora rN all-linear` → lora r=N, target_modules "all-linear";
  `lora rN (q,v)` → lora r=N on q_proj, v_proj; `dora ...` → the same lora with use_dora; "+ lm_head" → the output
  head a LoRA target too (torchtune's apply_lora_to_output); "modules_to_save" (Qwen's "LoRA (emb)") → lora with
  modules_to_save embed_tokens and lm_head;
  `qlora bnb int4` → qlora (defaults); `adalora rN [all-linear]` → adalora target_r=N, init_r=2N (the default
  ratio), target "all-linear" when said; `ia3` → ia3 (`ia3 all-linear ... ff=a,b` → every projection, a, b the
  feed-forward ones); `prompt_tuning` → prompt_tuning; `prefix_tuning` →
  prefix_tuning; `adapter (houlsby-style)` → adapter placement houlsby; `full + galore rN` → galore rank N;
  `full` → full; a LoRA row whose precision says int8 / 8-bit → qlora with `quantization.load_in_8bit` (LoRA over
  bitsandbytes' LLM.int8() base); a string whose first word names another PEFT type (`loha`, `lokr`, `vera`, `boft`,
  `oft`, `fourierft`, `ln_tuning`, `p-tuning`, `adaption_prompt`, ... : PEFT_TYPE_WORDS) → method "peft" with that
  type, its rank, listed targets and "field value" pairs, over the source's experiment config (PEFT_EXPERIMENTS,
  the experiment's adapter_config.json); "lora on gptq int4/int8" (or a GPTQ precision) → qlora with
  `quantization` {quant_method gptq, bits 4/8, group_size 128} (Qwen's Int4 checkpoints: bits 4, group size 128).
  "+ LoRA-FA optimizer" with optimizer "lora-fa" → lora with `optim` lorafa (PEFT's create_lorafa_optimizer).
  `full + lisa (N layers)` → freeze with trainable_layers -N and extra_modules embed_tokens, norm, lm_head (LISA's
  worst interval: the first N blocks, backward through every block; LMFlow and ms-swift keep the embeddings and the
  head trained); `freeze (last N layers)` / `freeze (N layers)` → freeze trainable_layers N; `llama-pro (N blocks)`
  → llama_pro with num_new_blocks N (ms-swift's llamapro_num_new_blocks). Not modelled (skipped): unsloth
  (UNMODELLED).
- Training: batch, seq_len as given; grad_ckpt on/off → gradient_checkpointing; bf16; optimizer "AdamW" →
  `adamw_torch` (torch.optim.AdamW with its defaults, which is what both sources ran: it takes the foreach path on
  CUDA); rows whose source says "FA2 OFF (eager attn)" → attn_implementation "eager", else the default (SDPA,
  whose flash/memory-efficient kernels save what FlashAttention-2 saves). GPUs through the catalog's
  aliases (A100-80GB → `a100-80gb`, L40S-48GB → `l40s`).
- The PEFT MetaMathQA rows are variable-length with a maximum of 768 tokens: estimated at 768 (the longest batch sets
  the peak).

A second file, `bench/anchors_extra.csv` (72 rows collected from torchtune, PEFT's README and docs, Qwen's README,
AnswerDotAI/fsdp_qlora, GaLore and LLaMA-Factory; each row's `source` names the file, commit and table it was read
from), adds two columns: `unit` (GiB, GB, or unknown = read as GB) and `stat` (reserved → compared with
`peak_reserved_gib`; allocated/active → the tensor bytes; device/unknown → `peak_vram_gib`). Its rows go through the
same rules, plus: explicit target lists `(q,v,o,gate,up,down)` → the `*_proj` modules (T5/mT0: q, v; BLOOM:
query_key_value); torchtune's chunked cross-entropy → `cross_entropy: chunked`; the optimizer step in backward
(torchtune's `optimizer_in_bwd`, GaLore's per-layer updates) → `optimizer_in_backward` (accumulation 1, no clipping);
activation offloading → `activation_offloading`; torch.compile ("compile", not "no compile") → `torch_compile`;
in a table whose techniques add up row by row (torchtune's 'Optimization flags'), a "+technique" row keeps the
compile, chunked loss and offloading of the rows above it (`CUMULATIVE`); "-offload" multi-GPU rows (FSDP
offload_params) → `zero3_offload_params`; a non-AdamW optimizer, unstated checkpointing, or lengths far below the
stated cap are skipped with the reason; precision fp32 → fp32 weights without autocast; and Qwen's full-parameter
rows run its DeepSpeed bf16 script (fp32 master weights and states: `SOURCE_TRAINING`). Exact cross-checks default to none for this file.

Run: `HF_HUB_OFFLINE=1 .venv/bin/python -m bench.anchors [--csv FILE] [--exact-rows N] [--out PATH] [--markdown]`
(`--csv bench/anchors_extra.csv --out bench/results/anchors_extra.json` for the extra set).
"""

from __future__ import annotations

import argparse
import csv
import os
import re
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from bench.accuracy import REPO, environment, loadavg, percentile, write_json

DEFAULT_CSV = "/work/shared/anchors/public_measurements.csv"
DEFAULT_OUT = "bench/results/anchors.json"
GIB = 2**30
GB_TO_GIB = 1e9 / 2**30

CATALOG = {"llama-3.2-3b": "meta-llama/Llama-3.2-3B", "llama3-8b-instruct": "meta-llama/Meta-Llama-3-8B",
           "meta-llama-3-8b-instruct": "meta-llama/Meta-Llama-3-8B", "llama-3.1-8b-instruct": "meta-llama/Llama-3.1-8B",
           "llama-2-7b-hf": "meta-llama/Llama-2-7b-hf", "llama-2-70b-hf": "meta-llama/Llama-2-70b-hf", "bigscience/t0_3b": "bigscience/T0_3B",
           "bigscience/mt0-xxl": "bigscience/mt0-xxl", "bigscience/bloomz-7b1": "bigscience/bloomz-7b1",
           # GaLore's configs/llama_7b.json: LLaMA-1 7B's shapes (4096 wide, 11008 MLP, 32 blocks of 32 heads, vocab
           # 32000), which are Llama-2-7B's (6.74B parameters either way)
           "llama-7b (random init, llama_7b.json)": "meta-llama/Llama-2-7b-hf"}
# cards a source does not name ("unknown", "2xGPU-FSDP", "2x40GB-ZeRO3"): the peak does not depend on which GPU,
# only the fit would; every named card goes through the catalog's own aliases (`_catalog_gpu`)
UNNAMED_GPUS = {"unknown": "a100-80gb", "gpu": "a100-80gb", "40gb": "a100-40gb", "24gb": "rtx-4090"}
UNMODELLED = ("unsloth",)
# PEFT's other adapter types (method "peft", config.peft = the type's adapter_config.json), by the first word of a
# method string
PEFT_TYPE_WORDS = {"loha": "LOHA", "lokr": "LOKR", "vera": "VERA", "boft": "BOFT", "oft": "OFT",
                   "fourierft": "FOURIERFT", "ln_tuning": "LN_TUNING", "p-tuning": "P_TUNING", "ptuning": "P_TUNING",
                   "adaption_prompt": "ADAPTION_PROMPT", "osf": "OSF", "trainable_tokens": "TRAINABLE_TOKENS",
                   "tinylora": "TINYLORA", "miss": "MISS", "randlora": "RANDLORA", "lily": "LILY", "bone": "BONE",
                   "hra": "HRA", "c3a": "C3A", "road": "ROAD", "delora": "DELORA", "gralora": "GRALORA",
                   "vblora": "VBLORA", "shira": "SHIRA", "waveft": "WAVEFT", "hira": "HIRA", "psoft": "PSOFT",
                   "glora": "GLORA", "peanut": "PEANUT", "deft": "DEFT", "unilora": "UNILORA"}
# training techniques a row's source names that the estimator does not model (it would over-estimate them)
UNMODELLED_TECHNIQUES = {"real lengths short": "lengths far below the stated cap (the longest batch is unknown)"}
# short target names in method strings → module names per family (Llama-style *_proj; T5 q/v; BLOOM fused qkv)
SHORT_TARGETS = {"q": "q_proj", "k": "k_proj", "v": "v_proj", "o": "o_proj", "gate": "gate_proj", "up": "up_proj",
                 "down": "down_proj"}
QKV = ["q_proj", "k_proj", "v_proj"]
ALL_LINEAR = [SHORT_TARGETS[x] for x in ("q", "k", "v", "o", "gate", "up", "down")]  # a Llama-style block's
# rows simulated exactly as a cross-check when --exact-rows is not given (1-based CSV data rows): Qwen-7B LoRA,
# full and QLoRA at 2048 (ms-swift), Llama-3.2-3B LoRA r32 and AdaLoRA r32 (PEFT MetaMathQA)
DEFAULT_EXACT = (3, 11, 15, 36, 39)


def map_model(name: str) -> Any:
    """A listed catalog id, else what the catalog resolves the name to as it would for a user: an id or alias, or
    the entry a chat/instruct variant, copy or mirror shares its architecture with."""
    from advisor.catalog.models import find_model, related_entry

    key = name.strip().lower()
    if key not in CATALOG:  # "Llama-2-7b-hf (bf16)": a note about the run, not the model
        name = re.sub(r"\s*\([^)]*\)\s*$", "", name).strip() or name
        key = name.lower()
    if key in CATALOG:
        return CATALOG[key]
    entry = find_model(name) or (related_entry(name) or (None,))[0]
    if entry is not None:
        return entry.id
    raise KeyError(f"no mapping for model {name!r}")


def _normalize_method(text: str) -> str:
    """A method string in the spelling the rules read: lowercase, single spaces; "r=16" / "rank 16" / "lora-r8" →
    "r16"; spaced method names → their ids ("prefix tuning" → prefix_tuning, "full fine-tuning" → full);
    "4-bit" / "8 bit" → "4bit" / "8bit"; "all linear (layers)" / "(all)" → "all-linear"."""
    t = " ".join(text.strip().lower().split())
    t = re.sub(r"\brank\s*[=:]?\s*(\d+)\b", r"r\1", t)
    t = re.sub(r"\br\s*[=:]\s*(\d+)\b", r"r\1", t)
    t = re.sub(r"(?<=[a-z])-r(\d+)\b", r" r\1", t)  # "lora-r8"
    for spaced, word in (("prefix tuning", "prefix_tuning"), ("prefix-tuning", "prefix_tuning"),
                         ("prompt tuning", "prompt_tuning"), ("prompt-tuning", "prompt_tuning"),
                         ("p tuning", "p-tuning"), ("llama-adapter", "adaption_prompt"),
                         ("llama adapter", "adaption_prompt"), ("ln tuning", "ln_tuning"), ("long lora", "longlora"),
                         ("full fine-tuning", "full"), ("full finetuning", "full"), ("full fine tuning", "full"),
                         ("full-parameter", "full"), ("full parameter", "full"), ("full-ft", "full"),
                         ("full ft", "full")):
        t = t.replace(spaced, word)
    t = re.sub(r"\b(\d+)[ -]bits?\b", r"\1bit", t)
    t = re.sub(r"\ball[ -]linear( layers)?|\(all\)|\ball (layers|modules|projections)\b", "all-linear", t)
    t = re.sub(r"\b(r\d+) all\b(?!-)", r"\1 all-linear", t)  # "lora r16 all"
    return t


def _listed_targets(t: str) -> str | list[str] | None:
    """The LoRA targets a (normalized) method string names: "all-linear"; a list of short names or module names,
    bracketed or not ("(q,v,o,gate,up,down)", "(q_proj, v_proj)", "q,v"); letters "qkvo" / "(qkv)"; BLOOM's
    "(query_key_value)". None when it names none (or Qwen-1's "(c_attn)", mapped by the caller)."""
    if "all-linear" in t:
        return "all-linear"
    groups = re.findall(r"\(([a-z_,\s]+)\)", t) + re.findall(r"(?<![\w(])([a-z_]+(?:\s*,\s*[a-z_]+)+)", t)
    for group in groups:
        names = [x for x in re.split(r"[,\s]+", group.strip()) if x]
        if names == ["query_key_value"]:  # BLOOM's fused attention projection
            return ["query_key_value"]
        short = [x[:-5] if x.endswith("_proj") else x for x in names]
        if short and all(x in SHORT_TARGETS for x in short):
            return [SHORT_TARGETS[x] for x in short]
    for word in re.findall(r"[a-z]+", t):  # "qkvo", "qv": one letter per projection, in order
        if len(word) > 1 and re.fullmatch(r"q?k?v?o?", word):
            return [SHORT_TARGETS[c] for c in word]
    return None


def map_method(text: str) -> tuple[str | None, dict, str | None]:
    """(method id, peft, skip reason) for a CSV method string."""
    t = _normalize_method(text)
    for word in UNMODELLED:
        if word in t:
            return None, {}, f"{word}: not a method the advisor models"
    rank = re.search(r"\br(\d+)\b", t)
    r = int(rank.group(1)) if rank else None
    first = re.split(r"[\s(]", t, maxsplit=1)[0]
    if first in PEFT_TYPE_WORDS:  # any other PEFT type: its rank, targets and "field value" pairs the string names
        return "peft", peft_type_config(PEFT_TYPE_WORDS[first], t, r), None
    words = set(re.findall(r"[a-z0-9+_-]+", t))
    lora_word = next((w for w in ("qlora", "qdora", "lora", "dora", "rslora", "lora+", "loraplus", "pissa", "olora")
                      if w in words or t.startswith(w)), None)
    four_bit = bool(words & {"4bit", "int4", "nf4", "fp4", "bnb4bit"})
    if lora_word and not t.startswith(("adalora", "longlora", "molora")):
        peft = {"r": r} if r else {}
        if lora_word in ("dora", "qdora") or "dora" in words:  # DoRA: LoRA with the weight decomposed (use_dora)
            peft["use_dora"] = True
        if lora_word == "rslora" or "rslora" in words:  # rank-stabilized scaling: the same tensors
            peft["use_rslora"] = True
        targets = _listed_targets(t)
        if "+ lm_head" in t:  # torchtune's apply_lora_to_output: the output head is a LoRA target too
            targets = (ALL_LINEAR if targets == "all-linear" else list(targets or QKV)) + ["lm_head"]
        if targets:
            peft["target_modules"] = targets
        if "modules_to_save" in t:  # Qwen's "LoRA (emb)": embedding and output head trained whole (wte, lm_head)
            peft["modules_to_save"] = ["embed_tokens", "lm_head"]
        if lora_word in ("qlora", "qdora") or (four_bit and "gptq" not in t):
            # QLoRA, or LoRA over a 4-bit base the string names: rank and targets when given, else the source's
            # (SOURCE_PEFT); "fp4" is bitsandbytes' other 4-bit type (map_row sets the quantization)
            return "qlora", peft, None
        # else "(c_attn)" (Qwen-1's fused qkv) or no targets: the source's default (SOURCE_PEFT), else q, k, v
        return "lora", peft, None
    if t.startswith("adalora"):
        peft = {"target_r": r, "init_r": 2 * r} if r else {}
        if "all-linear" in t:
            peft["target_modules"] = "all-linear"
        return "adalora", peft, None
    if t.startswith("ia3") or t.startswith("(ia)3"):
        ff = re.search(r"ff=([a-z,]+)", t.replace(" ", ""))
        if "all-linear" in t and ff:  # every projection; the feed-forward ones named by "ff="
            return "ia3", {"target_modules": list(ALL_LINEAR),
                           "feedforward_modules": [SHORT_TARGETS[x] for x in ff.group(1).split(",")]}, None
        return "ia3", {}, None
    for prefix, method in (("prompt_tuning", "prompt_tuning"), ("prefix_tuning", "prefix_tuning"),
                           ("longlora", "longlora"), ("bitfit", "bitfit"), ("molora", "molora")):
        if t.startswith(prefix):
            tokens = re.search(r"\b(\d+) (?:virtual )?tokens\b", t)
            return method, ({"num_virtual_tokens": int(tokens.group(1))} if tokens and "tuning" in method else {}), None
    if t.startswith("adapter") or t.startswith("bottleneck adapter"):
        return "adapter", {"placement": "houlsby"} if "houlsby" in t else {}, None
    if re.search(r"\bllama[-_ ]?pro\b", t):  # LLaMA-Pro: N new blocks interleaved, only they train
        blocks = re.search(r"(\d+) (?:new |expanded )?blocks?", t)
        return "llama_pro", {"num_new_blocks": int(blocks.group(1))} if blocks else {}, None
    if "lisa" in t:  # LISA's worst interval (advisor.methods.freeze): the first N blocks, embeddings and head trained
        layers = re.search(r"(\d+) (?:activated )?layers?", t)
        return "freeze", {"trainable_layers": -int(layers.group(1)) if layers else -2,
                          "extra_modules": ["embed_tokens", "norm", "lm_head"]}, None
    if "galore" in t:
        return "galore", {"rank": r} if r else {}, None
    if t == "full" or (t.startswith("full") and "+" not in t):  # "full", "full fine-tuning", "full (bf16)"
        return "full", {}, None
    if t.startswith("freeze"):
        layers = re.search(r"(first )?(\d+) layers?", t)
        n = int(layers.group(2)) if layers else 2  # LLaMA-Factory's default freeze_trainable_layers
        return "freeze", {"trainable_layers": -n if layers and layers.group(1) else n}, None
    return None, {}, f"no mapping rule for {text!r}"


def peft_type_config(peft_type: str, t: str, r: int | None) -> dict:
    """config.peft for a PEFT type named by a method string: `rN` → r (for types with a rank), listed targets, and
    any "field value" pair naming a field of the type's config class ("decompose_factor 4")."""
    from advisor.methods.peft_any import config_fields

    peft: dict = {"peft_type": peft_type}
    fields = set(config_fields(peft))
    if r and "r" in fields:
        peft["r"] = r
    targets = _listed_targets(t)
    if targets and "target_modules" in fields:
        peft["target_modules"] = targets
    for name, value in re.findall(r"\b([a-z_]+) (\d+(?:\.\d+)?)\b", t):
        if name in fields and name != "r":
            peft[name] = float(value) if "." in value else int(value)
    return peft


# The adapter_config.json of PEFT MetaMathQA experiments (huggingface/peft method_comparison/MetaMathQA/experiments/
# <type>/<experiment>/adapter_config.json, read at the commits the rows name; provenance and nulls left out): a
# row whose source names its result file (`results/<type>--<experiment>.json`) runs that experiment; a main-file
# row, which names none, runs its type's first experiment listed here (PEFT_DEFAULT_EXPERIMENT)
PEFT_EXPERIMENTS = {
    "loha/llama-3.2-3B-rank32": {"peft_type": "LOHA", "r": 32, "alpha": 64, "target_modules": ["q_proj", "v_proj"]},
    "lokr/llama-3.2-3B-rank32-factor4-lr0.003": {"peft_type": "LOKR", "r": 32, "alpha": 64, "decompose_factor": 4,
                                                 "target_modules": ["q_proj", "v_proj"]},
    "vera/llama-3.2-3B-default": {"peft_type": "VERA", "r": 256, "d_initial": 0.1, "save_projection": True},
    "boft/llama-3.2-3B-default": {"peft_type": "BOFT", "boft_block_num": 0, "boft_block_size": 4,
                                  "boft_n_butterfly_factor": 1},
    "oft/llama-3.2-3B-rank32": {"peft_type": "OFT", "r": 32, "oft_block_size": 0, "eps": 6e-05,
                                "target_modules": ["q_proj", "v_proj"]},
    "fourierft/llama-3.2-3B-default": {"peft_type": "FOURIERFT", "n_frequency": 1000, "scaling": 300,
                                       "random_loc_seed": 777, "init_weights": False,
                                       "target_modules": ["v_proj", "q_proj"]},
    "ln_tuning/llama-3.2-3B-default": {"peft_type": "LN_TUNING"},
    "ptuning/llama-3.2-3B-default": {"peft_type": "P_TUNING", "num_virtual_tokens": 20, "encoder_hidden_size": 3072,
                                     "encoder_num_layers": 2, "encoder_reparameterization_type": "MLP"},
    "adaptionprompt/llama-3.2-3B-lr_0.0005": {"peft_type": "ADAPTION_PROMPT", "adapter_layers": 28,
                                              "adapter_len": 100},
    "osf/llama-3.2-3B-rank128": {"peft_type": "OSF", "target_modules": list(ALL_LINEAR),
                                 "rank_pattern": {"q_proj": 2944, "o_proj": 2944, "k_proj": 896, "v_proj": 896,
                                                  "gate_proj": 2944, "down_proj": 2944, "up_proj": 2944}},
    "trainable_tokens/llama-3.2-3B-sos+eos": {"peft_type": "TRAINABLE_TOKENS", "token_indices": [128000, 128001]},
    "tinylora/llama-3.2-3B-default": {"peft_type": "TINYLORA", "r": 2, "u": 64, "weight_tying": 0.0},
    "miss/llama-3.2-3B-default": {"peft_type": "MISS", "r": 64, "mini_r": 1},
    "randlora/llama-3.2-3B-default": {"peft_type": "RANDLORA", "r": 32, "randlora_alpha": 640},
    "lily/llama-3.2-3B-rank140-mlp-a2-b2-s8.0": {"peft_type": "LILY", "r": 140, "num_B": 2, "stride_A": 14,
                                                 "scaling": 8.0,
                                                 "target_modules": ["gate_proj", "up_proj", "down_proj"]},
}
PEFT_DEFAULT_EXPERIMENT = {}
for _key, _cfg in PEFT_EXPERIMENTS.items():
    PEFT_DEFAULT_EXPERIMENT.setdefault(_cfg["peft_type"], _key)


def peft_experiment(row: dict, peft_type: str) -> dict:
    """The source's adapter_config for a PEFT MetaMathQA row of another PEFT type (empty for other sources)."""
    if source_short(row["source"]) != "peft-MetaMathQA":
        return {}
    named = re.search(r"results/([a-z_]+)--(llama-3\.2-3b-[^\s;()]+?)\.json", row["source"], re.IGNORECASE)
    if named:
        for key, cfg in PEFT_EXPERIMENTS.items():
            if key.lower() == f"{named.group(1)}/{named.group(2)}".lower():
                return dict(cfg)
    return dict(PEFT_EXPERIMENTS.get(PEFT_DEFAULT_EXPERIMENT.get(peft_type, ""), {}))


# What each source's own run configuration says, for what the method string leaves open (read from the sources,
# the same for every row of a source; never fitted to a measurement):
# - ms-swift docs/source/LLM/Benchmark.md: "if not given, these defaults are used: --lora_rank 8
#   --lora_target_modules DEFAULT" (DEFAULT = Qwen-1's c_attn = q, k, v): its QLoRA rows are LoRA r8 on q, k, v.
# - huggingface/peft method_comparison/MetaMathQA/experiments/*/llama-3.2-3B-*/adapter_config.json: prompt and
#   prefix tuning with num_virtual_tokens 200; AdaLoRA with init_r 64, target_r 32, target_modules null (PEFT's
#   default for Llama: q_proj, v_proj) and lora_dropout 0.0; LoRA with lora_dropout 0.0.
# - QLoRA, both sources: PEFT's `prepare_model_for_kbit_training` (non-quantized parameters upcast to fp32), which
#   the QLoRA reference script (artidoro/qlora qlora.py) and most published QLoRA recipes call before get_peft_model.
SOURCE_PEFT = {
    "ms-swift": {"qlora": {"r": 8, "target_modules": list(QKV), "upcast_non_quantized": True},
                 "lora": {"r": 8}},
    # torchtune builds its model under `training.set_default_dtype(self._dtype)` (bf16), so its LoRALinear's lora_a /
    # lora_b are bf16: PEFT's autocast_adapter_dtype false is the same
    "torchtune": {"lora": {"autocast_adapter_dtype": False}, "qlora": {"autocast_adapter_dtype": False}},
    # litgpt's --precision bf16-true: the LoRA weights (and their AdamW states) are bf16 like the model's
    "litgpt": {"lora": {"autocast_adapter_dtype": False}, "qlora": {"autocast_adapter_dtype": False}},
    "peft-MetaMathQA": {
        "prompt_tuning": {"num_virtual_tokens": 200},
        "prefix_tuning": {"num_virtual_tokens": 200},
        "adalora": {"init_r": 64, "target_r": 32, "target_modules": ["q_proj", "v_proj"], "lora_dropout": 0.0},
        "lora": {"lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},  # target_modules null: PEFT's
        # default for Llama (experiments/lora/llama-3.2-3B-rank32-dora/adapter_config.json)
        "qlora": {"upcast_non_quantized": True},
    },
}
# Training settings a source's own scripts fix for a method (same rule for every row of the source):
# - QwenLM/Qwen README: full-parameter finetuning runs finetune/finetune_ds.sh (`--bf16 True --deepspeed
#   finetune/ds_config_zero3.json`); DeepSpeed's bf16 mode keeps fp32 master weights and fp32 AdamW states, i.e.
#   mixed precision over fp32 parameters (its memory table is in GB: "We profile the memory (GB)").
# - huggingface/peft README (2022) table: examples/conditional_generation/peft_lora_seq2seq_accelerate_ds_zero3_offload.py
#   pads every target to `target_max_length = max(len(tokenizer(class_label)["input_ids"]) ...)`, the longest RAFT
#   twitter_complaints label ("Unlabeled" / "complaint" / "no complaint": ~4 T5 tokens with </s>), so the
#   encoder-decoder rows have a 4-token decoder (`max_target_length`; decoder-only rows ignore it).
SOURCE_TRAINING = {"Qwen-README": {"full": {"torch_dtype": "float32"}}}
# The bitsandbytes a source's 4-bit runs used, where its text does not say (a version named in the text wins):
# litgpt pinned bitsandbytes==0.42.0 from 2024-03-15 (pyproject.toml, commit 929f9c79) until 2024-12-28 (d2ed13c3,
# >=0.44), which covers its config hub table (2024-04-24 … 2024-09-27); its resource tables name 0.41.1. Before
# 0.43.2 the 4-bit matmul kept its input until backward (quantization.bitsandbytes_version).
SOURCE_BITSANDBYTES = {"litgpt": "0.42.0"}
SOURCE_TARGET_LENGTH = {"peft-README": 4}
ENCODER_DECODER = {"bigscience/T0_3B", "bigscience/mt0-xxl"}
# What each source measured: both report the caching allocator's reserve, without the CUDA context.
#   ms-swift: swift's get_max_cuda_memory() = torch.cuda.max_memory_reserved() / 1024**3 (GiB);
#   PEFT MetaMathQA run.py: torch.cuda.memory_reserved() after each step (the reserve only grows between its
#   empty_cache() calls, so it holds the step's peak) minus the reserve at start (~2 MiB), maximum over steps.
# So the estimate compared is `peak_reserved_gib` (the peak without the profile's CUDA context).
MEASURES_RESERVED = {"ms-swift", "peft-MetaMathQA"}


def map_row(row: dict) -> tuple[dict | None, str | None]:
    """The EstimateRequest payload for a CSV row, or the reason it is skipped."""
    method, peft, reason = map_method(row["method"])
    if method is None:
        return None, reason
    explicit = dict(peft)
    peft = {**SOURCE_PEFT.get(source_short(row["source"]).split(" ")[0], {}).get(method, {}), **explicit}
    if method == "peft":  # the source's experiment config, then what the string says
        peft = {**peft_experiment(row, explicit["peft_type"]), **explicit}
        if "autocast_adapter_dtype=false" in row["source"].lower():  # adapters left in the base's dtype
            peft["autocast_adapter_dtype"] = False
    if method == "adalora" and "r" in explicit:  # the method string's rank wins over the source default
        peft.update(explicit)
    if method == "lora" and "target_modules" not in peft:  # ms-swift's default for Llama-type models: q, k, v
        peft["target_modules"] = list(QKV)
    low = row["source"].lower()
    for word, technique in UNMODELLED_TECHNIQUES.items():
        if word in low:
            return None, f"{technique}: a technique the estimator does not model"
    if row["grad_ckpt"].strip().lower() not in ("on", "off", "true", "false", "yes", "no", "1", "0"):
        return None, f"gradient checkpointing {row['grad_ckpt']!r}: not stated by the source"
    optim = map_optimizer(row["optimizer"])
    if optim is None:
        return None, f"optimizer {row['optimizer']!r}: not mapped"
    training = {
        "per_device_train_batch_size": int(row["batch"]),
        "max_seq_length": int(row["seq_len"]),
        "gradient_checkpointing": row["grad_ckpt"].strip().lower() in ("on", "true", "yes", "1"),
        "optim": optim,
        "bf16": True,
    }
    training.update(SOURCE_TRAINING.get(source_short(row["source"]), {}).get(method, {}))
    # techniques the estimator models, by the words their sources use
    if any(w in low for w in ("chunkedoutputloss", "chunked ce", "chunked cross-entropy")):
        training["cross_entropy"] = "chunked"  # torchtune's CEWithChunkedOutputLoss
    if any(w in low for w in ("activation offload", "offload_activations", "activation_offloading", "act-offload")):
        training["activation_offloading"] = True  # saved activations in host memory until backward
    if re.search(r"(?<!no )\b(torch\.)?compile\b", low):
        training["torch_compile"] = True  # each block compiled (torchtune's compile: True), not "no compile"
    opt_text = row["optimizer"].lower()
    if "optimizer_in_bwd" in low or "in backward" in low or "layerwise" in opt_text or "per-layer" in row["method"]:
        # the step of each parameter inside backward (torchtune's optimizer_in_bwd, GaLore's per-layer updates):
        # no accumulation and no clipping, which both need every gradient at once
        training.update(optimizer_in_backward=True, gradient_accumulation_steps=1, max_grad_norm=0)
    precision = row.get("precision", "").strip().lower()
    quantization = None
    if "gptq" in row["method"].lower() or "gptq" in precision:
        if method not in ("lora", "qlora"):
            return None, f"precision {row.get('precision')!r}: a GPTQ base is modelled for LoRA only"
        # LoRA on a GPTQ checkpoint: Qwen's Int4 models (quantize_config: bits 4, group_size 128, desc_act false)
        bits = 8 if "int8" in (row["method"] + precision).lower() else 4
        method, quantization = "qlora", {"quant_method": "gptq", "bits": bits, "group_size": 128}
    elif re.search(r"int8|8bit|llm\.int8", precision.replace("-", "") + (
            " " + _normalize_method(row["method"]) if method in ("lora", "qlora") else "")):
        if method not in ("lora", "qlora"):
            return None, f"precision {row.get('precision')!r}: an 8-bit base is modelled for LoRA only"
        # LoRA over a bitsandbytes 8-bit base (LLM.int8(), its default outlier threshold 6.0)
        method, quantization = "qlora", {"load_in_8bit": True}
    elif re.search(r"int4|nf4|fp4|4bit", precision.replace("-", "")) or method == "qlora":
        if method not in ("lora", "qlora"):
            return None, f"precision {row.get('precision')!r}: a 4-bit base is modelled for LoRA only"
        # LoRA over a bitsandbytes 4-bit base (QLoRA): NF4 unless the row says FP4
        method = "qlora"
        if "fp4" in precision or "fp4" in row["method"].lower():
            quantization = {"bnb_4bit_quant_type": "fp4"}
    if "mixed" in precision or "amp" in precision.split():  # fp32 master weights under bf16/fp16 autocast
        training["torch_dtype"] = "float32"
        if "fp16" in precision:
            training.update(bf16=False, fp16=True)
    elif precision in ("fp32", "float32"):  # weights loaded in fp32, no mixed precision
        training.update(bf16=False, torch_dtype="float32")
    elif precision in ("fp16", "float16") or precision.endswith("+fp16"):  # fp16 compute (V100/T4-era runs)
        training.update(bf16=False, fp16=True)
    if any(w in low for w in ("fa2 off", "eager", "matmul-softmax")):
        training["attn_implementation"] = "eager"
    if training["gradient_checkpointing"] and re.search(r"(?<!non-)(?<!non)\breentrant\)|use_reentrant[ =:]*true"
                                                        r"|reentrant_checkpointing[ =:]*true", low):
        training["gradient_checkpointing_reentrant"] = True  # torch's reentrant checkpoint, as the source ran it
    if method == "qlora" and not (quantization or {}).get("quant_method") and not (quantization or {}).get("load_in_8bit"):
        named = re.search(r"bitsandbytes[ =v]*(\d+\.\d+(?:\.\d+)?)", low)
        version = named.group(1) if named else SOURCE_BITSANDBYTES.get(source_short(row["source"]))
        if version:
            quantization = {**(quantization or {}), "bitsandbytes_version": version}
    gpu, count, strategy = map_gpu(row["gpu"])
    if gpu is None:
        return None, f"no mapping for GPU {row['gpu']!r}"
    try:
        model = map_model(row["model"])
    except KeyError as err:
        return None, str(err).strip('"')
    if isinstance(model, str) and model in ENCODER_DECODER and source_short(row["source"]) in SOURCE_TARGET_LENGTH:
        training["max_target_length"] = SOURCE_TARGET_LENGTH[source_short(row["source"])]
    if isinstance(model, str) and model.startswith("bigscience/") and "target_modules" in peft:
        # T5/mT0 name their attention projections q, k, v, o; BLOOM keeps its fused query_key_value
        peft["target_modules"] = [{"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o"}.get(m, m)
                                  for m in peft["target_modules"]]
    payload = {"model": model, "hardware": {"gpu": gpu, "count": count}, "method": method,
               "config": {"peft": peft, "training": training, **({"quantization": quantization} if quantization else {})}}
    if strategy:
        payload["_strategy"] = strategy  # passed to the estimator beside the request (not a request field)
    return payload, None


# techniques a cumulative table's row keeps from the rows above it (torchtune's 'Optimization flags': each row adds
# one to all the previous ones); the optimizer and checkpointing have their own columns
CUMULATIVE = {"torch_compile": True, "cross_entropy": "chunked", "activation_offloading": True}


def inherit_cumulative(row: dict, payload: dict, carried: dict[str, dict]) -> None:
    """In a table whose techniques add up ("applied cumulatively"), a "+technique" row also has every technique of
    the rows above it; rows that state their own set (the LoRA / QLoRA rows) keep theirs."""
    low = row["source"].lower()
    if "applied cumulatively" not in low or "step=" not in low:
        return
    table, step = low.split("step=", 1)
    training = payload["config"]["training"]
    if step.startswith("+"):
        for key, value in carried.get(table, {}).items():
            training.setdefault(key, value)
    carried[table] = {k: training[k] for k, v in CUMULATIVE.items() if training.get(k) == v}


def map_optimizer(text: str) -> str | None:
    """A CSV optimizer → ours: plain "AdamW" / "adamw_torch" is torch's AdamW (foreach on CUDA, what HF's Trainer
    ran by default), "fused" its fused kernel; bitsandbytes' 8-bit / paged variants ("adamw_bnb_8bit", "8-bit AdamW",
    "paged_adamw_32bit"), Lion (bitsandbytes' lion_8bit / lion_32bit), SGD and Adafactor by name; anything else
    (Sophia, AdEMAMix, ...) None."""
    t = re.sub(r"\([^)]*(bwd|backward|layerwise|per-layer)[^)]*\)", "", text.strip().lower())  # said elsewhere
    t = re.sub(r"[\s_\-.()]", "", t)  # "AdamW 8-bit" → "adamw8bit", "adamw_torch" → "adamwtorch"
    if t in ("adamw", "adam", "adamwtorch", "adamwhf", "torchoptimadamw", "adamwforeach"):
        return "adamw_torch"
    if "fused" in t and "adam" in t:
        return "adamw_torch_fused"
    if "galore" in t:  # GaLore's own optimizers (per-layer: the step in backward, set beside)
        return "galore_adamw_8bit" if "8bit" in t else "galore_adafactor" if "adafactor" in t else "galore_adamw"
    if "adam" in t and "8bit" in t:
        return "paged_adamw_8bit" if "paged" in t else "adamw_8bit"
    if "paged" in t and "adam" in t:
        return "paged_adamw_32bit"
    if t in ("lorafa", "lorafaoptimizer"):  # PEFT's create_lorafa_optimizer (LoRA's A frozen)
        return "lorafa"
    if "lion" in t:  # bitsandbytes' Lion (HF Trainer's lion_8bit / lion_32bit and paged forms)
        return ("paged_" if "paged" in t else "") + ("lion_8bit" if "8bit" in t else "lion_32bit")
    for word in ("sgd", "adafactor"):
        if t.startswith(word):  # "SGD (momentum 0.9)" keeps the momentum buffer: sgd's own state
            return word
    return None


def map_gpu(text: str) -> tuple[str | None, int, str | None]:
    """(catalog GPU, count, strategy) for a row's `gpu`: "A100-80GB" is one card; "NxCARD-FSDP" / "NxCARD-ZeRO3" are N
    cards fully sharded (FSDP FULL_SHARD and ZeRO-3 both shard weights, gradients and optimizer state: `zero3`),
    "-offload" marks CPU offload of the parameters (FSDP's offload_params, ZeRO-3's offload_param:
    `zero3_offload_params`); "-ZeRO2" / "-FSDP-grad-op" shard gradients and optimizer state (`zero2`); "NxCARD" and
    "NxCARD-DDP" are N replicas (`ddp`); "2xGPU-FSDP" (a source that does not name the card) is read as A100 80GB. A
    card the catalog does not know but whose memory the name gives ("RTX 8000 48GB") is read as a catalog card with
    that memory (the peak does not depend on the card, only the fit)."""
    t = " ".join(text.strip().lower().split())
    m = re.fullmatch(r"(\d+)\s*[x×]\s*(.+?)(?:[- ](fsdp|zero-?3|zero-?2|ddp|fsdp-grad-op|fsdp-shard-grad-op))?"
                     r"(-offload)?", t)
    if m is None or int(m.group(1)) < 1:
        return _card(t), 1, None
    count, card, kind = int(m.group(1)), _card(m.group(2)), (m.group(3) or "ddp").replace("-", "")
    if count == 1:
        return card, 1, None
    if kind in ("zero2", "fsdpgradop", "fsdpshardgradop"):
        return card, count, "zero2_offload" if m.group(4) else "zero2"
    if kind == "ddp":
        return card, count, "ddp"
    return card, count, "zero3_offload_params" if m.group(4) else "zero3"


def _card(name: str) -> str | None:
    """A card's catalog id: the sources' unnamed cards, the catalog's own names and aliases, else a catalog card of the
    memory the name states."""
    card = UNNAMED_GPUS.get(name) or _catalog_gpu(name)
    if card is None:
        size = re.search(r"(\d+)\s*gb\b", name)
        card = _gpu_of_memory(int(size.group(1))) if size else None
    return card


def _gpu_of_memory(gb: int) -> str | None:
    """The catalog GPU whose reported memory is closest to a marketed "<gb> GB" (within 10%), datacenter cards first."""
    from advisor.catalog.gpus import load_gpus

    order = {"datacenter": 0, "workstation": 1, "consumer": 2}
    best = sorted((abs(g.memory_gib - gb * 1e9 / GIB * 0.985) / gb, order.get(g.tier, 3), g.id) for g in load_gpus()
                  if g.vendor == "nvidia")
    return best[0][2] if best and best[0][0] <= 0.10 else None


def _catalog_gpu(name: str) -> str | None:
    """Any GPU name the catalog resolves ("A100-40GB", "RTX 4090", "H100-80GB", "A10G", "L4", ...)."""
    from advisor.catalog.gpus import resolve_gpu

    for candidate in (name, re.sub(r"-?(\d+)\s*gb$", r" \1gb", name), re.sub(r"[- ]?\d+\s*gb$", "", name),
                      name.replace("nvidia ", "").replace("tesla ", "").replace("geforce ", "")):
        try:
            return resolve_gpu(candidate).id
        except Exception:  # noqa: BLE001 - not this spelling
            continue
    return None


def source_short(src: str) -> str:
    s = src.lower()
    if "ms-swift" in s:
        return "ms-swift" + (" (eager)" if "fa2 off" in s else " (tuners)" if "tuners" in s else "")
    if "metamathqa" in s:
        return "peft-MetaMathQA"
    for key, name in (("litgpt", "litgpt"), ("lit-gpt", "litgpt"), ("axolotl", "axolotl"), ("philschmid", "philschmid"),
                      ("torchtune", "torchtune"), ("huggingface/peft readme", "peft-README"),
                      ("qwenlm/qwen", "Qwen-README"), ("fsdp_qlora", "AnswerDotAI-fsdp_qlora"),
                      ("galore", "GaLore"), ("llama-factory", "LLaMA-Factory"), ("peft docs", "peft-docs")):
        if key in s:
            return name
    return src[:30]


def measured_gib(row: dict) -> float:
    """The row's measurement in GiB: `unit` GiB as is; GB (and unstated units, the main file's convention) × 1e9/2³⁰."""
    value = float(row["peak_gb"])
    return value if (row.get("unit") or "").strip() == "GiB" else value * GB_TO_GIB


def compared_quantity(row: dict, source: str) -> str:
    """Which estimate a row's statistic corresponds to: the allocator's reserve (`max_memory_reserved`: the peak
    without the CUDA context), tensor bytes (`max_memory_allocated` / active bytes: no allocator slack, no context),
    or the device total (nvidia-smi, and statistics a source does not name)."""
    stat = (row.get("stat") or "").strip().lower()
    if stat == "reserved" or (not stat and source.split(" ")[0] in MEASURES_RESERVED):
        return "reserved"
    if stat in ("allocated", "active"):
        return "tensor"
    return "device"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--csv", default=DEFAULT_CSV)
    ap.add_argument("--out", default=DEFAULT_OUT)
    ap.add_argument("--exact-rows", default=None,
                    help="comma-separated CSV row numbers (1-based, header excluded) to simulate exactly; "
                         f"'none' for none; default {','.join(map(str, DEFAULT_EXACT))}")
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore")
    import logging

    logging.disable(logging.WARNING)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()

    from advisor.estimator.exact import exact_estimate
    from advisor.estimator.fast import fast_estimate
    from advisor.schemas import EstimateRequest

    env = environment()
    rows = list(csv.DictReader(open(args.csv, newline="")))
    t0 = time.perf_counter()
    results, skipped = [], []
    carried: dict[str, dict] = {}  # cumulative tables: the techniques of their rows so far
    for n, row in enumerate(rows, 1):
        try:
            payload, reason = map_row(row)
            base = {"row": n, "source": source_short(row["source"]), "model": row["model"],
                    "method_text": row["method"], "params_b": float(row["params_b"]), "batch": int(row["batch"]),
                    "seq_len": int(row["seq_len"]), "grad_ckpt": row["grad_ckpt"], "gpu": row["gpu"],
                    "measured_gb": float(row["peak_gb"]), "measured_gib": measured_gib(row),
                    "unit": row.get("unit") or "GB", "stat": row.get("stat") or ""}
        except (KeyError, TypeError, ValueError, AttributeError) as err:  # a malformed row is reported, not fatal
            skipped.append({"row": n, "source": str(row.get("source"))[:30], "model": row.get("model"),
                            "method_text": row.get("method"), "reason": f"malformed row: {type(err).__name__}: {err}"})
            continue
        if payload is None:
            skipped.append({**base, "reason": reason})
            continue
        inherit_cumulative(row, payload, carried)
        strategy = payload.pop("_strategy", None)
        req = EstimateRequest.model_validate(payload)
        t = time.perf_counter()
        try:
            est = fast_estimate(req, strategy=strategy)
        except Exception as err:  # noqa: BLE001 - reported per row
            results.append({**base, "payload": payload, "error": f"{type(err).__name__}: {err}"})
            continue
        seconds = time.perf_counter() - t
        # the naive rule per device: a sharded run (FSDP / ZeRO-3) splits it over the devices
        naive_gib = base["params_b"] * 1e9 * 2 * 4 / GIB / (payload["hardware"]["count"] if strategy else 1)
        quantity = compared_quantity(row, base["source"])
        tensor_bytes = est["peak_bytes"] - est["breakdown_gib"].get("overhead", 0.0) * GIB
        predicted = {"reserved": est["peak_reserved_bytes"], "tensor": tensor_bytes,
                     "device": est["peak_bytes"]}[quantity] / GIB
        results.append({
            **base, "payload": payload, "method": est["method"],
            "attn": payload["config"]["training"].get("attn_implementation", "sdpa"),
            "quantity": quantity, "strategy": est["strategy"], "devices": payload["hardware"]["count"],
            "compared": {"reserved": "peak_reserved_gib (no CUDA context)", "tensor": "tensor bytes (no overhead)",
                         "device": "peak_vram_gib"}[quantity],
            "predicted_gib": predicted, "device_total_gib": est["peak_bytes"] / GIB,
            "error_pct": (predicted - base["measured_gib"]) / base["measured_gib"] * 100,
            "naive_gib": naive_gib,
            "naive_error_pct": (naive_gib - base["measured_gib"]) / base["measured_gib"] * 100,
            # the same prediction without the (unmeasured) CUDA context/allocator overhead of the profile
            "tensor_gib": est["peak_bytes"] / GIB - est["breakdown_gib"].get("overhead", 0.0),
            "peak_phase": est["peak_phase"], "breakdown_gib": est["breakdown_gib"],
            "total_params": est["total_params"], "trainable_params": est["trainable_params"],
            "params_vs_published_pct": (est["total_params"] / (base["params_b"] * 1e9) - 1) * 100,
            "fast_seconds": seconds,
        })
        r = results[-1]
        r["tensor_error_pct"] = (r["tensor_gib"] - base["measured_gib"]) / base["measured_gib"] * 100
        print(f"  [{n}] {r['model']} {r['method_text']} b{r['batch']} s{r['seq_len']} gc={r['grad_ckpt']}: "
              f"pred {r['predicted_gib']:.2f} GiB, measured {r['measured_gib']:.2f} GiB, {r['error_pct']:+.1f}% "
              f"({seconds:.1f} s)", flush=True)

    # sensitivity (reported beside, never used for the headline numbers): the two global choices that move the
    # answer most: fused instead of foreach AdamW for full fine-tuning (foreach holds an update-sized copy of the
    # parameters inside optimizer.step), and QLoRA with PEFT's prepare_model_for_kbit_training upcast of the
    # non-quantized parameters (embeddings, lm_head, norms) to fp32; and for a paged optimizer with an unstated
    # statistic, the allocator's reserve instead of the device
    for r in results:
        if "error_pct" not in r:
            continue
        variant = None
        as_reserved = False
        paged = str(r["payload"]["config"]["training"].get("optim", "")).startswith("paged_")
        if paged and r["quantity"] == "device":
            # an unstated statistic of a run with paged optimizer state: the device holds what it can of the state,
            # an allocator statistic (what torchtune's log_memory_stats prints) none of it
            variant, as_reserved = ("the statistic read as the allocator's reserve (paged state outside it)", {}), True
        elif r["method"] == "full":
            variant = ("optim adamw_torch_fused", {"training": {"optim": "adamw_torch_fused"}})
        elif r["method"] == "qlora":
            variant = ("qlora upcast_non_quantized=False", {"peft": {"upcast_non_quantized": False}})
        if variant is None:
            continue
        name, change = variant
        p = {**r["payload"], "config": {k: {**v, **change.get(k, {})} for k, v in r["payload"]["config"].items()}}
        try:
            alt = fast_estimate(EstimateRequest.model_validate(p), strategy=r["strategy"])
        except Exception as err:  # noqa: BLE001
            r["sensitivity"] = {"variant": name, "error": f"{type(err).__name__}: {err}"}
            continue
        alt_tensor = alt["peak_bytes"] - alt["breakdown_gib"].get("overhead", 0.0) * GIB
        alt_gib = {"reserved": alt["peak_reserved_bytes"], "tensor": alt_tensor,
                   "device": alt["peak_bytes"]}["reserved" if as_reserved else r["quantity"]] / GIB
        r["sensitivity"] = {"variant": name, "predicted_gib": alt_gib,
                            "error_pct": (alt_gib - r["measured_gib"]) / r["measured_gib"] * 100}
        print(f"  sensitivity [{r['row']}] {r['model']} {r['method_text']} with {name}: {alt_gib:.2f} GiB "
              f"({r['sensitivity']['error_pct']:+.1f}% vs measured; headline {r['error_pct']:+.1f}%)", flush=True)

    # exact cross-check on a few rows
    ok = [r for r in results if "error_pct" in r]
    if args.exact_rows is None:
        exact_rows = list(DEFAULT_EXACT) if args.csv == DEFAULT_CSV else []
    elif args.exact_rows.strip().lower() == "none":
        exact_rows = []
    else:
        exact_rows = [int(x) for x in args.exact_rows.split(",") if x.strip()]
    for r in ok:
        if r["row"] not in exact_rows:
            continue
        t = time.perf_counter()
        try:
            ex = exact_estimate(EstimateRequest.model_validate(r["payload"]), allocator="fitted")
        except Exception as err:  # noqa: BLE001
            r["exact_error"] = f"{type(err).__name__}: {err}"
            continue
        from advisor.estimator.profile import load_profile

        context = load_profile("cuda").context_bytes() if r["compared"].startswith("peak_reserved") else 0.0
        r["exact_gib"] = (ex["peak_bytes"] - context) / GIB
        r["exact_phase"] = ex["peak_phase"]
        r["exact_error_pct"] = (r["exact_gib"] - r["measured_gib"]) / r["measured_gib"] * 100
        r["fast_vs_exact_pct"] = (r["predicted_gib"] - r["exact_gib"]) / r["exact_gib"] * 100
        r["exact_seconds"] = time.perf_counter() - t  # ~0 when the simulation was cached
        r["exact_sim_seconds"] = ex.get("simulation_seconds")  # the simulation's own time (kept in the cache)
        print(f"  exact [{r['row']}] {r['model']} {r['method_text']}: {r['exact_gib']:.2f} GiB "
              f"(fast {r['fast_vs_exact_pct']:+.2f}% vs exact; {r['exact_seconds']:.0f} s)", flush=True)

    summary = summarize(ok)
    out = {"benchmark": "anchors", **env, "csv": args.csv, "rows": results, "skipped": skipped, "summary": summary,
           "seconds_total": time.perf_counter() - t0, "loadavg_end": loadavg(),
           "notes": ["measured GB converted to GiB (x 1e9 / 2**30) unless the row's `unit` is GiB; unstated "
                     "units are read as GB",
                     "max_memory_reserved rows (ms-swift, PEFT MetaMathQA, `stat` reserved) are compared with "
                     "peak_reserved_gib (the estimate without the CUDA profile's context; its allocator fraction is "
                     "included); `stat` allocated/active with the tensor bytes; other rows with peak_vram_gib",
                     "PEFT MetaMathQA rows are variable-length (max 768): estimated at 768, the longest batch sets "
                     "the peak", "naive baseline = params_b x 1e9 x 2 bytes x 4"]}
    out_path = (REPO / args.out) if not Path(args.out).is_absolute() else Path(args.out)
    write_json(out_path, out)
    print()
    print(format_rows(results, args.markdown))
    print()
    print(format_summary(summary, args.markdown))
    print(f"\n{len(skipped)} rows skipped:")
    for s in skipped:
        print(f"  [{s['row']}] {s['model']} {s['method_text']}: {s['reason']}")
    print(f"\nwrote {out_path} in {out['seconds_total']:.0f} s")
    return 0


def _stats(rs: list[dict], key: str) -> dict:
    errs = [abs(r[key]) for r in rs]
    if not errs:
        return {"n": 0}
    w = max(rs, key=lambda r: abs(r[key]))
    return {"n": len(errs), "median_abs_pct": statistics.median(errs), "p90_abs_pct": percentile(errs, 0.9),
            "mean_signed_pct": statistics.fmean(r[key] for r in rs), "worst_pct": w[key],
            "worst_row": f"[{w['row']}] {w['model']} {w['method_text']} b{w['batch']} s{w['seq_len']} gc={w['grad_ckpt']}",
            "within_10pct": sum(e <= 10 for e in errs), "within_20pct": sum(e <= 20 for e in errs)}


def summarize(ok: list[dict]) -> dict:
    out = {"ours": _stats(ok, "error_pct"), "naive": _stats(ok, "naive_error_pct"),
           "ours_tensor_only": _stats(ok, "tensor_error_pct"), "by_source": {}, "by_method": {}}
    for src in dict.fromkeys(r["source"].split(" ")[0] for r in ok):
        rs = [r for r in ok if r["source"].split(" ")[0] == src]
        out["by_source"][src] = {"ours": _stats(rs, "error_pct"), "naive": _stats(rs, "naive_error_pct"),
                                 "ours_tensor_only": _stats(rs, "tensor_error_pct")}
    for m in dict.fromkeys(r["method"] for r in ok):
        rs = [r for r in ok if r["method"] == m]
        out["by_method"][m] = {"ours": _stats(rs, "error_pct"), "naive": _stats(rs, "naive_error_pct"),
                               "ours_tensor_only": _stats(rs, "tensor_error_pct")}
    ex = [r for r in ok if "fast_vs_exact_pct" in r]
    if ex:
        out["fast_vs_exact"] = {"n": len(ex), "worst_abs_pct": max(abs(r["fast_vs_exact_pct"]) for r in ex),
                                "rows": [r["row"] for r in ex]}
    return out


def _table(head: list[str], lines: list[list[str]], markdown: bool) -> str:
    from bench.accuracy import _table as table

    return table(head, lines, markdown)


def format_rows(results: list[dict], markdown: bool = False) -> str:
    head = ["#", "source", "model", "method", "b", "seq", "gc", "measured GiB", "ours GiB", "err %", "naive GiB",
            "naive err %", "phase", "exact GiB"]
    lines = []
    for r in results:
        if "error_pct" not in r:
            lines.append([str(r["row"]), r["source"], r["model"], r["method_text"], str(r["batch"]), str(r["seq_len"]),
                          r["grad_ckpt"], f"{r['measured_gib']:.2f}", "ERROR", r.get("error", "")[:60], "", "", "", ""])
            continue
        lines.append([str(r["row"]), r["source"], r["model"], r["method_text"] + (" [eager]" if r["attn"] == "eager" else ""),
                      str(r["batch"]), str(r["seq_len"]), r["grad_ckpt"], f"{r['measured_gib']:.2f}",
                      f"{r['predicted_gib']:.2f}", f"{r['error_pct']:+.1f}", f"{r['naive_gib']:.1f}",
                      f"{r['naive_error_pct']:+.0f}", str(r["peak_phase"]),
                      f"{r['exact_gib']:.2f}" if "exact_gib" in r else ""])
    return _table(head, lines, markdown)


def format_summary(summary: dict, markdown: bool = False) -> str:
    head = ["subset", "n", "ours median |err| %", "ours p90 |err| %", "ours worst err %", "ours mean signed %",
            "ours w/o overhead median |err| %", "naive median |err| %", "naive worst err %"]
    lines = []
    entries = [("ALL", {"ours": summary["ours"], "naive": summary["naive"],
                        "ours_tensor_only": summary["ours_tensor_only"]})]
    entries += [(f"source {k}", v) for k, v in summary["by_source"].items()]
    entries += [(f"method {k}", v) for k, v in summary["by_method"].items()]
    for name, st in entries:
        o, nv, to = st["ours"], st["naive"], st["ours_tensor_only"]
        if not o.get("n"):
            continue
        lines.append([name, str(o["n"]), f"{o['median_abs_pct']:.1f}", f"{o['p90_abs_pct']:.1f}",
                      f"{o['worst_pct']:+.1f}", f"{o['mean_signed_pct']:+.1f}", f"{to['median_abs_pct']:.1f}",
                      f"{nv['median_abs_pct']:.1f}", f"{nv['worst_pct']:+.1f}"])
    return _table(head, lines, markdown)


if __name__ == "__main__":
    sys.exit(main())
