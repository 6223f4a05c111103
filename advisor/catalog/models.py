"""Model catalog: ``profiles/models/*.json`` plus resolution of any model reference to a config.

Each catalog file holds the architecture fields of the model's hub ``config.json`` (verbatim), the
published parameter count and where it comes from.  Parameter counts are never taken from the
file: :meth:`ResolvedModel.num_params` instantiates the architecture on the ``meta`` device (which
allocates no memory) and sums ``p.numel()`` over ``model.parameters()`` (tied weights once); the test
suite checks that against ``published_params``.

:func:`resolve_model` accepts, in this order:

1. a catalog id or alias, case-insensitive; the part after ``/`` of a catalog id also works
   (``"llama-2-7b-hf"``);
2. a local directory containing ``config.json`` (or the path of a ``config.json`` file itself); the
   kind is ``seq2seq`` when the config says ``is_encoder_decoder``, else ``causal_lm``;
3. a dict, either
   a. a full config dict with ``"model_type"`` (what ``config.json`` holds), or
   b. an explicit *architecture object* describing a Llama-style decoder, built as a ``LlamaConfig``::

        {"hidden_size": 4096, "num_hidden_layers": 32,      # required
         "num_attention_heads": 32,      # default hidden_size // 128 (// 64 if that does not divide)
         "num_key_value_heads": 8,       # default num_attention_heads (no GQA)
         "intermediate_size": 14336,     # default Llama rule: 8/3 * hidden rounded up to 256
         "vocab_size": 32000,            # default 32000
         "max_position_embeddings": 4096,  # default 4096
         "head_dim": 128,                # default hidden_size // num_attention_heads
         "tie_word_embeddings": false,   # default false
         "params_b": 7,                  # optional claimed size in billions; must be within 25% of the
                                         # count computed from the shape, else an error
         "name": "my-model"}             # optional display id

4. any other string that looks like a Hub id: unless ``HF_HUB_OFFLINE=1`` its ``config.json`` is
   fetched with transformers (no ``trust_remote_code``).

Every failure raises :class:`advisor.errors.AdvisorInputError` on field ``model`` (or
``model.<key>`` for a bad architecture field).

Note on the T5 family under transformers 5: ``T5Config``/``MT5Config`` force
``tie_word_embeddings=True``, but T5 v1.1-derived checkpoints (flan-t5, T0, mT0) ship a separate
``lm_head`` (their ``config.json`` says ``"tie_word_embeddings": false``), which transformers keeps
untied when it loads the weights.  :meth:`ResolvedModel.build_meta` mirrors that by giving the output
embedding its own parameter when the raw config asked for untied embeddings but the config class
ignored it.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import math
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pydantic

from advisor.catalog.gpus import profiles_dir
from advisor.errors import AdvisorInputError
from advisor.files import write_text_atomic

Kind = Literal["causal_lm", "seq2seq"]

# Families whose position handling has no fixed table limit (relative attention / ALiBi).
_NO_ABSOLUTE_POSITIONS = {"t5", "mt5", "umt5", "longt5", "switch_transformers", "bloom"}
# Keys of config.json that describe the checkpoint, not the architecture; dropped before building.
_NON_ARCH_KEYS = {"architectures", "torch_dtype", "dtype", "transformers_version", "auto_map", "_name_or_path"}
_ARCH_OBJECT_KEYS = {
    "params_b", "name", "id", "hidden_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "intermediate_size", "vocab_size", "max_position_embeddings", "head_dim",
    "tie_word_embeddings",
}
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[A-Za-z0-9][\w.\-]*)?$")


class ModelEntry(pydantic.BaseModel):
    """One ``profiles/models/<slug>.json`` file."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)

    id: str
    aliases: list[str] = []
    family: str
    kind: Kind
    published_params: int = pydantic.Field(gt=0)
    published_params_exact: bool = True
    published_params_source: str | None = None
    license: str | None = None
    source: str
    notes: str | None = None
    config: dict[str, Any]

    @pydantic.field_validator("config")
    @classmethod
    def _has_model_type(cls, v: dict) -> dict:
        if not isinstance(v.get("model_type"), str):
            raise ValueError("config must contain a string 'model_type'")
        return v

    def keys(self) -> list[str]:
        """Lookup keys (lowercased): id, aliases, and the id's part after '/'."""
        names = [self.id, *self.aliases, self.id.rsplit("/", 1)[-1]]
        return list(dict.fromkeys(_norm(n) for n in names))


def _norm(ref: str) -> str:
    """Lookup form: case-insensitive, and a name typed with spaces ("Llama 2 7B", "Flan-T5 XL") is its dashed
    alias."""
    return re.sub(r"\s+", "-", ref.strip().lower())


def _mapping_names() -> tuple[dict, dict]:
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES,
    )

    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES


# --------------------------------------------------------------------------------------- catalog


@functools.lru_cache(maxsize=8)
def _load(directory: str) -> tuple[tuple[ModelEntry, ...], dict[str, str]]:
    files = sorted(Path(directory).glob("*.json"))
    entries: list[ModelEntry] = []
    for f in files:
        try:
            entries.append(ModelEntry.model_validate_json(f.read_text(encoding="utf-8")))
        except pydantic.ValidationError as e:
            raise ValueError(f"{f}: invalid model entry: {e}") from e
    index: dict[str, str] = {}
    for e in entries:
        for key in e.keys():
            other = index.setdefault(key, e.id)
            if other != e.id:
                raise ValueError(f"{directory}: model key {key!r} is claimed by both {other} and {e.id}")
    return tuple(entries), index


def _catalog() -> tuple[tuple[ModelEntry, ...], dict[str, str]]:
    return _load(str(profiles_dir() / "models"))


def load_models() -> list[ModelEntry]:
    """All catalog entries (parsed once per directory and cached)."""
    return list(_catalog()[0])


def model_ids() -> list[str]:
    return [e.id for e in _catalog()[0]]


def find_model(ref: str) -> ModelEntry | None:
    """Catalog lookup only; None if ``ref`` is not a catalog id/alias."""
    entries, index = _catalog()
    mid = index.get(_norm(ref))
    return next((e for e in entries if e.id == mid), None) if mid else None


# the part of a chat/instruct/pre-trained variant's name that its base entry lacks ("-Instruct", "-chat", "-it"; "-Base"
# where the unsuffixed id is the post-trained release, as for Qwen3)
_VARIANT_RE = re.compile(r"-(instruct|chat|it|base)(?=-|$)", re.IGNORECASE)
# suffixes of copies that keep the architecture: quantized or converted re-uploads ("unsloth/llama-3-8b-bnb-4bit",
# "TheBloke/Llama-2-7B-Chat-GPTQ", "Qwen/Qwen-7B-Chat-Int4", "...-AWQ", "...-GGUF", "...-fp16")
_COPY_SUFFIX_RE = re.compile(
    r"[-_.](?:unsloth[-_.])?(?:bnb[-_.]?)?(?:4bit|8bit)$"
    r"|[-_.](?:gptq(?:[-_.]int[48])?|awq|gguf|exl2|mlx|int4|int8|fp16|bf16|fp8|fp32)$",
    re.IGNORECASE,
)


def _respellings(name: str) -> list[tuple[str, str]]:
    """Other spellings of a model name, each with what was read differently: ms-swift's model-type names
    ("qwen1half-7b-chat" = Qwen1.5-7B-Chat, "llama3_1-8b-instruct" = Llama-3.1-8B-Instruct, "qwen2_5-7b" =
    Qwen2.5-7B, "qwen1half-moe-a2_7b" = Qwen1.5-MoE-A2.7B), and a family name with or without a dash before its
    version ("phi3-mini" = Phi-3-mini, "llama-3-8b" = llama3-8b, "glm4-9b" = glm-4-9b)."""
    org, _, tail = name.rpartition("/")
    forms = [(tail, [])]
    half = re.sub(r"(?i)1half", "1.5", tail)
    if half != tail:
        forms.append((half, ["'1half' as '1.5'"]))
    for form, why in list(forms):
        dotted = re.sub(r"(?<=\d)_(?=\d)", ".", form)
        if dotted != form:
            forms.append((dotted, why + ["'_' between digits as '.'"]))
    for form, why in list(forms):
        m = re.match(r"([A-Za-z]+)(-?)(\d)", form)
        if m:
            toggled = m.group(1) + ("" if m.group(2) else "-") + form[m.end(2):]
            forms.append((toggled, why + [f"{m.group(0)!r} as {toggled[:len(toggled) - len(form) + m.end()]!r}"]))
    return [((org + "/" if org else "") + form, ", ".join(why)) for form, why in forms[1:]]


# the families whose catalog names may appear inside a community fine-tune's name ("OpenHermes-2.5-Mistral-7B",
# "Nous-Hermes-2-Mixtral-8x7B-DPO", "vicuna-7b-v1.5" is not one: it names no base): a catalog key that is one of
# these words followed by a size
_BASE_IN_NAME_RE = re.compile(
    r"(?:^|[-_/])((?:llama-?[123](?:\.\d)?|mistral|mixtral|qwen(?:\d(?:\.\d)?)?|gemma(?:-?\d)?|phi-?\d(?:\.\d)?"
    r"|yi(?:-1\.5)?|falcon|deepseek-llm|codellama|tinyllama|smollm2?|olmo(?:-2)?|internlm2(?:_5|\.5)?|baichuan2"
    r"|starcoder2?|mpt|granite(?:-3\.\d)?)-[0-9.x]+[bm](?:-v\d+(?:\.\d+)?)?)(?=$|[-_.])",
    re.IGNORECASE,
)


# well-known community fine-tunes whose names do not name their base, with the base their model cards state
_FINE_TUNES = (
    (r"vicuna-(7|13)b-v1\.5(-16k)?", "meta-llama/Llama-2-{}b-hf", "LMSYS: Vicuna v1.5 is fine-tuned from Llama 2"),
    (r"vicuna-(7|13|33)b(-v1\.[0-3])?", "huggyllama/llama-{}b", "LMSYS: Vicuna v1.0-v1.3 are fine-tuned from LLaMA"),
    (r"guanaco-(7|13|33|65)b", "huggyllama/llama-{}b", "Dettmers et al. 2023 (QLoRA): Guanaco is LLaMA + QLoRA"),
    (r"alpaca-(7|13)b", "huggyllama/llama-{}b", "Stanford Alpaca: fine-tuned from LLaMA"),
    (r"zephyr-7b-(alpha|beta)", "mistralai/Mistral-7B-v0.1", "HuggingFaceH4: fine-tuned from Mistral-7B-v0.1"),
    (r"openchat[-_]3\.5(-\d+)?", "mistralai/Mistral-7B-v0.1", "OpenChat 3.5: fine-tuned from Mistral-7B-v0.1"),
    (r"starling-lm-7b-(alpha|beta)", "mistralai/Mistral-7B-v0.1", "Starling-LM-7B: fine-tuned from OpenChat 3.5, "
     "itself Mistral-7B-v0.1"),
    (r"neural-chat-7b-v3(-\d)?", "mistralai/Mistral-7B-v0.1", "Intel neural-chat-7b-v3: fine-tuned from "
     "Mistral-7B-v0.1"),
)


def _known_fine_tune(tail: str) -> tuple[ModelEntry, str] | None:
    for pattern, base, source in _FINE_TUNES:
        m = re.fullmatch(pattern, tail, re.IGNORECASE)
        if m:
            size = {"33": "30"}.get(m.group(1), m.group(1)) if "{}" in base else None
            entry = find_model(base.format(size) if size else base)
            if entry is not None:
                return entry, f"a fine-tune of {entry.id} ({source}; added tokens, if any, are not counted)"
    return None


def related_entry(ref: str) -> tuple[ModelEntry, str] | None:
    """The catalog entry whose architecture a reference that is not itself in the catalog shares, and why; None when
    there is none. Tried in order: the name as given, then without its organisation (a mirror such as
    "NousResearch/Llama-2-7b-hf" or "unsloth/Meta-Llama-3.1-8B"); each without the suffix of a quantized or
    converted copy ("-bnb-4bit", "-GPTQ", "-AWQ", "-GGUF", "-Int4", "-fp16"); each of those without its variant part
    ("-Instruct" / "-chat" / "-it" / "-Base": "meta-llama/Llama-2-7b-chat-hf" → Llama-2-7b-hf, "Qwen3-8B-Base" →
    Qwen3-8B) or with it read as "-Base" ("Mistral-Nemo-Instruct-2407" → Mistral-Nemo-Base-2407). Version suffixes
    stay, so "Mistral-7B-Instruct-v0.4" finds nothing rather than another version's architecture. Then the same for
    the name's other spellings (`_respellings`: ms-swift's "qwen1half-7b-chat", "llama3_1-8b-instruct";
    "phi3-mini-4k-instruct"). Last, a community fine-tune whose name contains a catalog model's name with its size
    ("teknium/OpenHermes-2.5-Mistral-7B" → Mistral-7B), the longest such name; its added tokens, if any, are not
    counted."""
    name = re.sub(r"\s+", "-", ref.strip())  # "Llama 2 7B chat" as typed
    found = _related_by_name(name)
    if found:
        return found
    for spelling, why in _respellings(name):
        entry = find_model(spelling)
        found = (entry, "the same model") if entry is not None else _related_by_name(spelling)
        if found:
            return found[0], f"{found[1]}, spelled differently ({why})"
    tail = name.rsplit("/", 1)[-1]
    for start in [tail, *(c for c in (_COPY_SUFFIX_RE.sub("", tail),) if c != tail)]:
        found = _known_fine_tune(start) or _known_fine_tune(_VARIANT_RE.sub("", start))
        if found:
            return found
    for base in sorted((m.group(1) for m in _BASE_IN_NAME_RE.finditer(tail)), key=len, reverse=True):
        rest = tail[len(base):] if tail.lower().startswith(base.lower()) else None
        if rest == "" or (rest is not None and re.search(r"(?i)(^|-)v\d", rest)):
            continue  # the model itself, or another version of it ("Mistral-7B-Instruct-v0.4"), not a fine-tune
        entry = find_model(base) or (_related_by_name(base) or (None,))[0]
        if entry is None:
            for spelling, _ in _respellings(base):
                entry = find_model(spelling)
                if entry is not None:
                    break
        if entry is not None:
            return entry, (f"a fine-tune of {entry.id} by its name (it names {base!r}; fine-tunes keep their base "
                           "model's architecture, tokens they add to the vocabulary are not counted)")
    return None


def _related_by_name(name: str) -> tuple[ModelEntry, str] | None:
    starts = [name] + ([name.rsplit("/", 1)[-1]] if "/" in name else [])
    for mirror, start in enumerate(starts):
        copies, s = [start], start
        while (shorter := _COPY_SUFFIX_RE.sub("", s)) != s and shorter:
            copies.append(shorter)
            s = shorter
        for copy_index, c in enumerate(copies):
            candidates = [(c, False)]
            for variant in (_VARIANT_RE.sub("", c), _VARIANT_RE.sub("-Base", c, count=1)):
                if variant != c:
                    candidates.append((variant, True))
            for candidate, is_variant in candidates:
                if candidate == name:
                    continue
                entry = find_model(candidate)
                if entry is None:
                    continue
                why = []
                if copy_index:
                    why.append(f"a quantized or converted copy ({start[len(c):]!r} suffix: a quantized copy's memory is "
                               "that of the matching method or config.quantization)")
                if is_variant:
                    why.append("a chat/instruct/pre-trained variant of it (variants keep their base model's architecture)")
                if mirror:
                    why.append(f"the same name under another organisation ({name.split('/', 1)[0]!r})")
                return entry, "; ".join(why) or "the same model"
    return None


def base_variant(ref: str) -> ModelEntry | None:
    """The catalog entry a reference not in the catalog shares its architecture with (`related_entry`), or None."""
    found = related_entry(ref)
    return found[0] if found else None


def close_matches(ref: str, n: int = 3) -> list[str]:
    """Catalog ids whose names are nearest to a reference that resolved to nothing (for "did you mean")."""
    import difflib

    entries, index = _catalog()
    tail = _norm(ref).rsplit("/", 1)[-1]
    keys = difflib.get_close_matches(tail, list(index), n=8, cutoff=0.6)
    return list(dict.fromkeys(index[k] for k in keys))[:n]


def clear_cache() -> None:
    """Forget parsed catalogs and computed parameter counts."""
    _load.cache_clear()
    _read_shipped.cache_clear()
    _PARAM_CACHE.clear()


# --------------------------------------------------------------------------------------- configs


def config_from_dict(raw: dict, field_name: str = "model"):
    """Build a ``PretrainedConfig`` from a config.json-style dict (needs ``model_type``)."""
    import transformers
    from transformers import CONFIG_MAPPING

    # a deep copy: transformers' config classes update nested dicts in place (rope_scaling gains rope_theta and
    # rope_type), which would change the catalog entry, and with it the config hash that keys cached results
    d = copy.deepcopy({k: v for k, v in raw.items() if k not in _NON_ARCH_KEYS})
    model_type = d.pop("model_type", None)
    if not isinstance(model_type, str):
        raise AdvisorInputError(field_name, "config has no 'model_type'")
    if model_type not in CONFIG_MAPPING:
        raise AdvisorInputError(
            field_name,
            f"model_type {model_type!r} is not supported by transformers {transformers.__version__} "
            "(custom code models are not loaded)",
        )
    try:
        config = CONFIG_MAPPING[model_type].from_dict(d)
    except Exception as e:  # transformers raises ValueError/TypeError/StrictDataclass errors
        raise AdvisorInputError(field_name, f"invalid {model_type} config: {e}") from e
    _check_dimensions(config, raw, field_name)
    return config


# The sizes a config may give, with the largest the advisor accepts: well above every published model (hidden 18432 for
# PaLM-540B and 16384 for Llama-3.1-405B, 126 blocks, vocabularies of 262k, 10M positions for Llama-4-Scout), low
# enough that a typo (a vocabulary of 0 or 10^9) is an error naming the key instead of a failure deep in the
# simulation, whose adapters are built on the CPU for real
DIMENSION_LIMITS = {
    "hidden_size": 131_072, "intermediate_size": 1_048_576, "num_hidden_layers": 1024, "num_attention_heads": 4096,
    "num_key_value_heads": 4096, "head_dim": 8192, "vocab_size": 4_194_304, "max_position_embeddings": 1 << 24,
    # Doge's cross-domain MoE routes over 16,384 tiny experts
    "num_local_experts": 1 << 20, "num_experts": 1 << 20, "n_routed_experts": 1 << 20,
}
# values a config class gives a meaning of its own: XLNet's -1 (no position limit), GLM-5's head_dim 0 (derived)
DIMENSION_SENTINELS = {"max_position_embeddings": (-1,), "head_dim": (0,)}


def _check_dimensions(config, raw: dict, field_name: str) -> None:
    """Each size the config gives (its text config's too) is a whole number in 1..DIMENSION_LIMITS[key]; the error
    names the key as the dict spelled it (GPT-2's n_embd for hidden_size)."""
    configs = [(config, raw)]
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if text is not config:
        configs.append((text, raw.get("text_config") if isinstance(raw.get("text_config"), dict) else {}))
    for cfg, given in configs:
        aliases = getattr(cfg, "attribute_map", {}) or {}
        for key, limit in DIMENSION_LIMITS.items():
            try:
                value = getattr(cfg, key, None)
            except Exception:  # noqa: BLE001 - a config property that cannot answer does not give this size
                continue
            if value is None:
                continue
            spelled = aliases.get(key) if aliases.get(key) in given else key
            prefix = f"{field_name}.text_config" if cfg is not config else field_name
            if isinstance(value, dict) or value in DIMENSION_SENTINELS.get(key, ()):  # LXMERT's layers per stack
                continue
            per_block = isinstance(value, (list, tuple))  # per-block sizes (Gemma-3n's MLP widths)
            if not all(_whole_in(v, limit) for v in (value if per_block else [value])) or value in ([], ()):
                raise AdvisorInputError(f"{prefix}.{spelled}", f"must be a whole number in 1..{limit:,}"
                                        f"{' (or a list of them, one per block)' if per_block else ''}, got {value!r}")


def _whole_in(v, limit: int) -> bool:
    """v is a whole number in 1..limit (an int, or a float without a fraction; not a bool, NaN or infinity)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (isinstance(v, float) and not math.isfinite(v)):
        return False
    return v == int(v) and 1 <= v <= limit


def _infer_kind(config, field_name: str = "model") -> Kind:
    causal, seq2seq = _mapping_names()
    mt = config.model_type
    if getattr(config, "is_encoder_decoder", False):
        if mt not in seq2seq:
            raise AdvisorInputError(
                field_name, f"encoder-decoder model_type {mt!r} has no seq2seq LM head in transformers"
            )
        return "seq2seq"
    if mt not in causal:
        raise AdvisorInputError(
            field_name,
            f"model_type {mt!r} has no causal LM head in transformers "
            "(only causal LMs and seq2seq models are supported)",
        )
    return "causal_lm"


def _canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=str, separators=(",", ":"))


def _short_hash(obj: Any) -> str:
    return hashlib.sha256(_canonical_json(obj).encode()).hexdigest()[:10]


# --------------------------------------------------------------------------------------- resolved

_PARAM_CACHE: dict[str, int] = {}
_PARAM_LOCK = threading.Lock()


@dataclass(eq=False)
class ResolvedModel:
    """A model reference turned into a transformers config.

    ``raw_config`` is the config dict as given (catalog file, config.json, dict); it is kept because
    some config classes drop information (see the T5 note in the module docstring).
    """

    id: str
    kind: Kind
    config: Any  # transformers.PretrainedConfig
    entry: ModelEntry | None = None
    path: str | None = None
    origin: Literal["catalog", "local", "dict", "hub"] = "catalog"
    raw_config: dict | None = field(default=None, repr=False)
    declared_params: int | None = None
    note: str | None = None  # how the reference was resolved, when that is not obvious (a base-model fallback)

    # ---- building
    def _untied_output_requested(self) -> bool:
        return bool(
            self.raw_config is not None
            and self.raw_config.get("tie_word_embeddings") is False
            and getattr(self.config, "tie_word_embeddings", False)
        )

    def build_meta(self):
        """The model instantiated on the meta device (no memory); a fresh module each call."""
        import torch
        from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

        auto = AutoModelForSeq2SeqLM if self.kind == "seq2seq" else AutoModelForCausalLM
        with torch.device("meta"):
            model = auto.from_config(copy.deepcopy(self.config))
            if self._untied_output_requested():
                _untie_output_embeddings(model)
        return model

    def cache_key(self) -> str:
        return _config_hash(self.kind, self.raw_config if self.raw_config is not None else self.config.to_dict())

    def count_params(self) -> int:
        """Total parameter count (tied weights counted once), computed now on the meta device, no cache."""
        return sum(p.numel() for p in self.build_meta().parameters())

    def num_params(self) -> int:
        """Total parameter count (tied weights counted once), computed on meta (`count_params`); cached by config
        hash in memory and on disk (the computation is exact but takes ~0.1 s per architecture, seconds cold), and
        read from the summaries shipped for the catalog (`profiles/model_summaries.json`, by the same config hash;
        the test suite recomputes every one)."""
        key = self.cache_key()
        n = _PARAM_CACHE.get(key)
        if n is None:
            n = (shipped_summaries().get(key) or {}).get("params")
        if n is None:
            n = _disk_param_cache().get(key)
        if n is None:
            n = self.count_params()
            _store_param_count(key, n)
        with _PARAM_LOCK:
            _PARAM_CACHE[key] = n
        return n

    # ---- shape summary
    @property
    def model_type(self) -> str:
        return self.config.model_type

    @property
    def family(self) -> str:
        return self.entry.family if self.entry else self.config.model_type

    @property
    def max_positions(self) -> int | None:
        """Longest position the embedding table / rope setup is configured for; None when the family has
        no absolute limit (T5 relative attention, BLOOM ALiBi)."""
        if self.config.model_type in _NO_ABSOLUTE_POSITIONS:
            return None
        for attr in ("max_position_embeddings", "n_positions"):
            v = getattr(self.config, attr, None)
            if isinstance(v, int) and v > 0:
                return v
        return None

    @property
    def num_layers(self) -> int | None:
        return getattr(self.config, "num_hidden_layers", None)

    @property
    def hidden_size(self) -> int | None:
        return getattr(self.config, "hidden_size", None)

    @property
    def vocab_size(self) -> int | None:
        return getattr(self.config, "vocab_size", None)

    def to_public(self) -> dict:
        n = self.num_params()
        out = {
            "id": self.id,
            "origin": self.origin,
            "path": self.path,
            "family": self.family,
            "kind": self.kind,
            "model_type": self.model_type,
            "params": n,
            "params_b": round(n / 1e9, 3),
            "layers": self.num_layers,
            "hidden": self.hidden_size,
            "vocab": self.vocab_size,
            "max_positions": self.max_positions,
        }
        if self.kind == "seq2seq":
            out["decoder_layers"] = getattr(self.config, "num_decoder_layers", self.num_layers)
        if self.entry is not None:
            out["published_params"] = self.entry.published_params
            out["published_params_exact"] = self.entry.published_params_exact
            out["license"] = self.entry.license
            out["source"] = self.entry.source
        if self.declared_params is not None:
            out["declared_params"] = self.declared_params
        return out


def _config_hash(kind: str, config: dict) -> str:
    return hashlib.sha256(_canonical_json({"kind": kind, "config": config}).encode()).hexdigest()


SHIPPED_SUMMARIES = "model_summaries.json"
_SUMMARY_FIELDS = ("params", "layers", "hidden", "vocab", "max_positions")


def _shipped_summaries_path() -> Path:
    return profiles_dir() / SHIPPED_SUMMARIES


@functools.lru_cache(maxsize=8)
def _read_shipped(path: str) -> dict[str, dict]:
    try:
        rows = json.loads(Path(path).read_text(encoding="utf-8"))["models"]
        out = {}
        for r in rows.values():
            if not isinstance(r.get("params"), int) or not all(f in r for f in _SUMMARY_FIELDS):
                raise ValueError("incomplete row")
            out[r["config_sha256"]] = {f: r[f] for f in _SUMMARY_FIELDS}
        return out
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}  # missing or unreadable: everything is computed (the file only saves time)


def shipped_summaries() -> dict[str, dict]:
    """The catalog's computed summaries shipped with it (parameter count, layers, hidden size, vocabulary, longest
    position), by config hash (`ResolvedModel.cache_key`): building 200-odd configs and counting them on meta takes
    ~20 s of CPU and imports transformers, which `advisor models` or a cold recommendation would otherwise pay."""
    return _read_shipped(str(_shipped_summaries_path()))


def computed_summary(rm: ResolvedModel, fresh: bool = True) -> dict:
    """`rm`'s summary fields computed now; `fresh`: the count too, on meta (not from a cache or the shipped table)."""
    return {"params": rm.count_params() if fresh else rm.num_params(), "layers": rm.num_layers,
            "hidden": rm.hidden_size, "vocab": rm.vocab_size, "max_positions": rm.max_positions}


def write_shipped_summaries(path: Path | None = None) -> Path:
    """Compute every catalog model's summary and write them with their config hashes; `python -m
    advisor.catalog.models` runs it after a catalog change (tests/test_catalog.py checks it is current)."""
    import transformers

    path = path or _shipped_summaries_path()
    models = {}
    for e in load_models():
        rm = resolve_model(e.id)
        models[e.id] = {"config_sha256": rm.cache_key(), **computed_summary(rm)}
    doc = {"about": "the catalog's models summarized from their configs, parameters counted on the meta device (tied "
                    "weights once); regenerate with `python -m advisor.catalog.models`",
           "transformers": transformers.__version__, "models": models}
    path.write_text(json.dumps(doc, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    _read_shipped.cache_clear()
    return path


def _param_cache_path() -> Path:
    from advisor.settings import get_settings

    return get_settings().cache_dir / "param_counts.json"


def _disk_param_cache() -> dict[str, int]:
    try:
        data = json.loads(_param_cache_path().read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _store_param_count(key: str, n: int) -> None:
    path = _param_cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _PARAM_LOCK:
            data = _disk_param_cache()
            data[key] = n
            write_text_atomic(path, json.dumps(data))
    except OSError:
        pass  # a read-only cache dir only costs recomputation


def _untie_output_embeddings(model) -> None:
    import torch
    from torch import nn

    out, inp = model.get_output_embeddings(), model.get_input_embeddings()
    if out is None or inp is None or out.weight is not inp.weight:
        return
    name = next(n for n, m in model.named_modules() if m is out)
    out.weight = nn.Parameter(torch.empty_like(out.weight), requires_grad=out.weight.requires_grad)
    tied = getattr(model, "all_tied_weights_keys", None)
    if isinstance(tied, dict):
        tied.pop(f"{name}.weight", None)


# --------------------------------------------------------------------------------------- resolve


def resolve_model(ref: str | dict | os.PathLike | ResolvedModel) -> ResolvedModel:
    """Turn a catalog id/alias, local directory, config dict, architecture object or Hub id into a
    :class:`ResolvedModel` (see the module docstring for the accepted forms)."""
    if isinstance(ref, ResolvedModel):
        return ref
    if isinstance(ref, dict):
        return _resolve_dict(ref)
    if isinstance(ref, os.PathLike):
        ref = os.fspath(ref)
    if not isinstance(ref, str) or not ref.strip():
        raise AdvisorInputError(
            "model", "expected a model id, a local directory with config.json, or an architecture object",
            allowed=model_ids(),
        )
    ref = ref.strip()

    entry = find_model(ref)
    if entry is not None:
        return _from_entry(entry)

    p = Path(ref).expanduser()
    if p.is_dir():
        cfg_file = p / "config.json"
        if not cfg_file.is_file():
            raise AdvisorInputError("model", f"local directory {str(p)!r} has no config.json")
        return _from_file(cfg_file, p)
    if p.is_file():
        if p.name.endswith(".json"):
            return _from_file(p, p.parent)
        raise AdvisorInputError("model", f"{str(p)!r} is a file, not a model directory or config.json")
    dashed = re.sub(r"\s+", "-", ref)
    if dashed != ref and _HUB_ID_RE.match(dashed):  # "Llama 2 7B chat" as typed: the dashed name's resolution
        return resolve_model(dashed)
    if ref.startswith(("/", "./", "../", "~", ".\\")) or not _HUB_ID_RE.match(ref):
        raise AdvisorInputError(
            "model", f"unknown model {ref!r}: not in the catalog and no such local directory", allowed=model_ids()
        )
    return _from_hub(ref)


def _from_entry(entry: ModelEntry) -> ResolvedModel:
    # A fresh ResolvedModel (and config) per call, so callers may modify it; the expensive part,
    # the parameter count, is cached by config hash.
    config = config_from_dict(entry.config)
    return ResolvedModel(id=entry.id, kind=entry.kind, config=config, entry=entry, origin="catalog",
                         raw_config=entry.config)


def _from_file(cfg_file: Path, directory: Path) -> ResolvedModel:
    try:
        raw = json.loads(cfg_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise AdvisorInputError("model", f"cannot read {str(cfg_file)!r}: {e}") from e
    if not isinstance(raw, dict):
        raise AdvisorInputError("model", f"{str(cfg_file)!r} does not hold a JSON object")
    config = config_from_dict(raw)
    kind = _infer_kind(config)
    mid = raw.get("_name_or_path") or str(directory.resolve())
    return ResolvedModel(id=str(mid), kind=kind, config=config, path=str(directory.resolve()), origin="local",
                         raw_config=raw)


def _from_hub(ref: str) -> ResolvedModel:
    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
    reason = "HF_HUB_OFFLINE=1"
    raw = None
    if not offline:
        try:
            from transformers import PretrainedConfig

            raw, _ = PretrainedConfig.get_config_dict(ref)
        except Exception as e:  # network errors, 404, gated repos, ...
            reason = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
    if raw is None:
        found = related_entry(ref)
        if found is not None:
            base, why = found
            rm = _from_entry(base)
            rm.note = (f"{ref!r} is not in the catalog and the Hub could not be reached ({reason}): using the "
                       f"architecture of {base.id}, as {ref!r} is {why}")
            return rm
        near = close_matches(ref)
        raise AdvisorInputError(
            "model",
            f"unknown model {ref!r}: not in the catalog, not a local directory with config.json, "
            f"and the Hub could not be reached ({reason})"
            + (f"; did you mean {', '.join(near)}?" if near else "")
            + "; or give the architecture itself: a config.json dict with model_type, or "
            "{hidden_size, num_hidden_layers, ...} (GET /v1/models lists the catalog)",
            allowed=model_ids(),
        )
    config = config_from_dict(raw)
    return ResolvedModel(id=ref, kind=_infer_kind(config), config=config, origin="hub", raw_config=raw)


def _resolve_dict(d: dict) -> ResolvedModel:
    if "model_type" in d:
        config = config_from_dict(d)
        kind = _infer_kind(config)
        mid = d.get("_name_or_path") or f"custom-{config.model_type}-{_short_hash(d)}"
        return ResolvedModel(id=str(mid), kind=kind, config=config, origin="dict", raw_config=dict(d))
    return _from_architecture(d)


def _pos_int(d: dict, key: str, default: int | None = None) -> int:
    v = d.get(key, default)
    if v is None:
        raise AdvisorInputError(
            f"model.{key}",
            f"architecture object needs {key!r} (required: hidden_size, num_hidden_layers); "
            "or pass a catalog id, a local directory, or a full config dict with 'model_type'",
        )
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise AdvisorInputError(f"model.{key}", f"must be a positive integer, got {v!r}")
    return v


def _from_architecture(d: dict) -> ResolvedModel:
    unknown = sorted(set(d) - _ARCH_OBJECT_KEYS)
    if unknown:
        raise AdvisorInputError(
            f"model.{unknown[0]}",
            f"unknown architecture field(s) {unknown}; give 'model_type' for a full config dict",
            allowed=sorted(_ARCH_OBJECT_KEYS),
        )
    hidden = _pos_int(d, "hidden_size")
    layers = _pos_int(d, "num_hidden_layers")
    default_heads = hidden // 128 if hidden % 128 == 0 else max(1, hidden // 64)
    heads = _pos_int(d, "num_attention_heads", default_heads)
    kv = _pos_int(d, "num_key_value_heads", heads)
    if heads % kv:
        raise AdvisorInputError("model.num_key_value_heads", f"{kv} does not divide num_attention_heads={heads}")
    if "head_dim" in d:
        head_dim = _pos_int(d, "head_dim")
    else:
        if hidden % heads:
            raise AdvisorInputError(
                "model.num_attention_heads", f"{heads} does not divide hidden_size={hidden}; give head_dim"
            )
        head_dim = hidden // heads
    inter = _pos_int(d, "intermediate_size", 256 * math.ceil(8 * hidden / 3 / 256))
    vocab = _pos_int(d, "vocab_size", 32000)
    max_pos = _pos_int(d, "max_position_embeddings", 4096)
    tie = d.get("tie_word_embeddings", False)
    if not isinstance(tie, bool):
        raise AdvisorInputError("model.tie_word_embeddings", f"must be true or false, got {tie!r}")
    raw = {
        "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": hidden,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv,
        "head_dim": head_dim, "intermediate_size": inter, "vocab_size": vocab,
        "max_position_embeddings": max_pos, "tie_word_embeddings": tie, "hidden_act": "silu",
        "rms_norm_eps": 1e-05, "rope_theta": 10000.0,
    }
    config = config_from_dict(raw)
    name = d.get("name") or d.get("id") or f"custom-llama-{layers}x{hidden}"
    declared = None
    if d.get("params_b") is not None:
        pb = d["params_b"]
        if isinstance(pb, bool) or not isinstance(pb, (int, float)) or pb <= 0:
            raise AdvisorInputError("model.params_b", f"must be a positive number (billions), got {pb!r}")
        declared = int(round(pb * 1e9))
    rm = ResolvedModel(id=str(name), kind="causal_lm", config=config, origin="dict", raw_config=raw,
                       declared_params=declared)
    if declared is not None:
        n = rm.num_params()
        if abs(n - declared) > 0.25 * declared:
            raise AdvisorInputError(
                "model.params_b",
                f"params_b={d['params_b']} does not match the given shape, which has {n / 1e9:.2f}B parameters "
                "as a Llama-style decoder (allowed difference 25%)",
            )
    return rm


# --------------------------------------------------------------------------------------- table


def model_table() -> list[dict]:
    """One summary row per catalog model (computed parameter count): from the shipped summaries where an entry's
    config hash matches, else computed."""
    rows = []
    shipped = shipped_summaries()
    for e in load_models():
        summary = shipped.get(_config_hash(e.kind, e.config)) or computed_summary(resolve_model(e.id), fresh=False)
        rows.append({
            "id": e.id,
            "family": e.family,
            "kind": e.kind,
            "params": summary["params"],
            "params_b": round(summary["params"] / 1e9, 3),
            "published_params": e.published_params,
            "layers": summary["layers"],
            "hidden": summary["hidden"],
            "vocab": summary["vocab"],
            "max_positions": summary["max_positions"],
        })
    return rows


if __name__ == "__main__":
    print(f"wrote {write_shipped_summaries()}")
