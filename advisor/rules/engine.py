"""The rule engine: ``rules.yaml`` (the seeds' decision rules, as data) evaluated over scenario facts.

    facts = facts_from_scenario(scenario)        # model, hardware and dataset resolved into flat facts
    ev = evaluate(facts)                          # pure; well under 1 ms once the YAML is loaded (~0.4 s)

`evaluate` returns an :class:`Evaluation`: the rules that fired (id, source, says), the decision and the rules
behind it, a score per method (sum of the fired rules' ``prefer``/``avoid`` weights; rules tagged with the same
``claim`` -- several seeds repeating one statement -- count once per method, with the largest weight) with the
methods the rules or the `applicability` constraints make infeasible, merged hyperparameter suggestions (with
every override reported), notes, and the conflicts: disagreement groups (``conflict:`` tags in the YAML) where
rules on two or more sides fired.

The YAML is loaded and validated once (:func:`load_rules`): structure, known facts/methods/knobs/decisions,
expression shapes, and every citation (the seed file exists, the section heading exists in it, the quote is an
exact substring of that section). A malformed rule raises :class:`RulesError` naming the rule and the problem.

Condition language (no eval)::

    {"fact": NAME, "op": OP, "value": VALUE}     OP: == != < <= > >= in not_in contains is_null not_null
    {"all": [COND, ...]}  {"any": [COND, ...]}  {"not": COND}      omitted `when` = always

    VALUE: a literal | {"fact": NAME} | {"add"|"sub"|"mul"|"div"|"min"|"max": [VALUE, ...]} | {"round": VALUE}
    and, in `set` only, {"param": "<method>.<knob>"}: the suggestion merged so far (e.g. alpha = 2 x r),
    or {"range": [lo, hi]}: keep the value set so far if it lies in the range, else clamp it into the range
    (lo when nothing was set yet) -- the seeds' "r=16-32" style advice.

`set` keys are "<method>.<knob>" or "all.<knob>" (every method that has the knob). Rules apply in file order
(then by an optional integer `specificity`, default 0): a later rule's value replaces an earlier one's, and the
replacement is reported in Evaluation.overrides.

A comparison with a fact that is null (unknown / not stated) is false; only ``is_null`` matches it.
"""

from __future__ import annotations

import functools
import math
import operator
import os
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from advisor.errors import AdvisorInputError
from advisor.rules import seedtext
from advisor.rules.scenario import DECISIONS, PRIORITIES, TASKS, Scenario, parse_scenario

RULES_ENV = "ADVISOR_RULES_FILE"
RULES_PATH = Path(__file__).resolve().with_name("rules.yaml")
CATEGORIES = ("when_not", "decision", "hardware", "data", "task", "quick", "priority", "context", "method", "hyper",
              "symptom")

# ----------------------------------------------------------------------------------------------- facts

# name -> (type, description). Types: num, bool, str, list. Missing/unknown values are None.
FACTS: dict[str, tuple[str, str]] = {
    # model
    "model_id": ("str", "resolved model id"),
    "model_type": ("str", "transformers model_type (llama, t5, ...)"),
    "model_family": ("str", "catalog family, else model_type"),
    "kind": ("str", "causal_lm | seq2seq"),
    "is_encoder_decoder": ("bool", "kind == seq2seq (T5-style encoder-decoder)"),
    "params": ("num", "total parameters"),
    "params_b": ("num", "total parameters in billions"),
    "num_layers": ("num", "transformer layers"),
    "hidden_size": ("num", "hidden size"),
    "model_max_positions": ("num", "longest position the model is configured for (None: no absolute limit)"),
    "has_biases": ("bool", "the model has bias parameters (BitFit can train them without adding any)"),
    "weights_fp16_gib": ("num", "params x 2 bytes, GiB (16-bit weights alone)"),
    "weights_4bit_gib": ("num", "params x 0.5 bytes, GiB (4-bit weights alone)"),
    # hardware
    "has_gpu": ("bool", "a local accelerator is available"),
    "gpu_name": ("str", "accelerator name"),
    "gpu_id": ("str", "catalog id (None when given only by vram_gib)"),
    "gpu_vendor": ("str", "nvidia | amd | apple"),
    "gpu_architecture": ("str", "Ampere, Hopper, ..."),
    "gpu_tier": ("str", "consumer | workstation | datacenter | unified-memory | unknown | none"),
    "gpu_count": ("num", "accelerators (0 when there is none)"),
    "multi_gpu": ("bool", "gpu_count > 1"),
    "gpu_memory_gib": ("num", "memory per device as the runtime reports it (or vram_gib)"),
    "gpu_usable_memory_gib": ("num", "memory per device a training process can allocate"),
    "gpu_nominal_gb": ("num", "the size the card is sold as (24 for an RTX 4090): what the seeds' tiers quote"),
    "total_gpu_memory_gib": ("num", "gpu_memory_gib x gpu_count"),
    "total_gpu_usable_memory_gib": ("num", "gpu_usable_memory_gib x gpu_count"),
    "bf16_supported": ("bool", "native bf16 (Ampere or newer)"),
    "gpu_usd_per_hour": ("num", "catalog price per GPU-hour"),
    # dataset
    "num_examples": ("num", "training examples"),
    "avg_tokens": ("num", "mean tokens per example"),
    "max_tokens": ("num", "tokens in the longest example"),
    "dataset_tokens": ("num", "num_examples x avg_tokens"),
    # request
    "task": ("str", "one of the CONTRACT tasks"),
    "priority": ("str", "balanced | quality | cost | speed | min_params"),
    "budget_max_usd": ("num", "budget.max_usd"),
    "budget_max_hours": ("num", "budget.max_hours"),
    # context (see advisor.rules.scenario.Context)
    "prompting_tried": ("bool", ""),
    "prompting_sufficient": ("bool", ""),
    "knowledge_changes_often": ("bool", ""),
    "needs_external_knowledge": ("bool", ""),
    "new_language_or_domain": ("bool", ""),
    "managed_api_ok": ("bool", ""),
    "num_domains": ("num", ""),
    "num_tasks": ("num", ""),
    "first_finetune": ("bool", ""),
    "latency_critical": ("bool", ""),
    "evaluation_defined": ("bool", ""),
    "can_maintain_model": ("bool", ""),
    "requirements_change_often": ("bool", ""),
    "frontier_model_handles_task": ("bool", ""),
    "needs_behavior_change": ("bool", ""),
    "reduce_prompt_length": ("bool", ""),
    "examples_exceed_context": ("bool", ""),
    "needs_modular_adapters": ("bool", ""),
    "production_deployment": ("bool", ""),
    "research_project": ("bool", ""),
    "preserve_general_capabilities": ("bool", ""),
    "symptoms": ("list", "problems seen in an earlier run"),
}
FACT_NAMES = tuple(FACTS)
_BLANK_FACTS: dict[str, Any] = dict.fromkeys(FACT_NAMES)

# Sizes accelerators are sold as; a catalog card's reported GiB rounds up to one of these ("24 GB" 4090: 23.65).
_NOMINAL_SIZES = (4, 6, 8, 10, 11, 12, 16, 20, 24, 32, 40, 48, 64, 80, 94, 96, 128, 141, 180, 192, 256, 288)


class RulesError(ValueError):
    """rules.yaml is malformed (names the rule and the problem)."""


# ----------------------------------------------------------------------------------------- expressions

_CMP: dict[str, Callable[[Any, Any], bool]] = {
    "==": operator.eq, "!=": operator.ne, "<": operator.lt, "<=": operator.le, ">": operator.gt, ">=": operator.ge,
    "in": lambda a, b: a in b, "not_in": lambda a, b: a not in b, "contains": lambda a, b: b in a,
}
_ARITH: dict[str, Callable[[list[Any]], Any]] = {
    "add": lambda xs: sum(xs),
    "sub": lambda xs: xs[0] - sum(xs[1:]),
    "mul": lambda xs: math.prod(xs),
    "div": lambda xs: xs[0] / xs[1],
    "min": lambda xs: min(xs),
    "max": lambda xs: max(xs),
}
_NUMERIC_OPS = {"<", "<=", ">", ">="}

Value = Callable[[Mapping[str, Any], Mapping[tuple[str, str], Any]], Any]
_EMPTY_PARAMS: dict = {}
Cond = Callable[[Mapping[str, Any]], bool]


class _Ctx:
    """What compilation needs to know and record (for validation and the docs)."""

    def __init__(self, rule_id: str, method_ids: tuple[str, ...], knobs: Mapping[str, set[str]]):
        self.rule_id = rule_id
        self.method_ids = method_ids
        self.knobs = knobs
        self.facts: set[str] = set()
        self.params: set[tuple[str, str]] = set()

    def fail(self, msg: str) -> RulesError:
        return RulesError(f"rule {self.rule_id}: {msg}")


def _compile_value(node: Any, ctx: _Ctx, allow_param: bool) -> tuple[Value, bool]:
    """-> (fn(facts, params), depends_on_params)."""
    if isinstance(node, dict):
        if len(node) != 1:
            raise ctx.fail(f"value expression must have exactly one key, got {sorted(node)}")
        (key, arg), = node.items()
        if key == "fact":
            if arg not in FACTS:
                raise ctx.fail(f"unknown fact {arg!r}")
            ctx.facts.add(arg)
            return (lambda f, p, _n=arg: f.get(_n)), False
        if key == "param":
            if not allow_param:
                raise ctx.fail("{param: ...} is only allowed in `set` values")
            method, knob = _split_key(str(arg), ctx, allow_all=False)
            ctx.params.add((method, knob))
            return (lambda f, p, _k=(method, knob): p.get(_k)), True
        if key == "round":
            inner, dep = _compile_value(arg, ctx, allow_param)

            def _round(f, p, _i=inner):
                v = _i(f, p)
                return None if v is None else int(round(v))
            return _round, dep
        if key in _ARITH:
            if not isinstance(arg, list) or len(arg) < (2 if key in ("sub", "div") else 1):
                raise ctx.fail(f"{key} needs a list of operands")
            parts = [_compile_value(a, ctx, allow_param) for a in arg]
            fns = [fn for fn, _ in parts]
            op = _ARITH[key]

            def _arith(f, p, _fns=fns, _op=op):
                xs = [fn(f, p) for fn in _fns]
                if any(x is None or isinstance(x, (str, bool, list)) for x in xs):
                    return None
                if _op is _ARITH["div"] and xs[1] == 0:
                    return None
                return _op(xs)
            return _arith, any(d for _, d in parts)
        raise ctx.fail(f"unknown value expression {key!r}")
    if isinstance(node, (int, float, str, bool, list)) or node is None:
        return (lambda f, p, _v=node: _v), False
    raise ctx.fail(f"bad value {node!r}")


def _compile_cond(node: Any, ctx: _Ctx) -> Cond:
    if node is None or node == "always":
        return lambda f: True
    if not isinstance(node, dict):
        raise ctx.fail(f"condition must be a mapping, got {node!r}")
    if "fact" in node:
        extra = set(node) - {"fact", "op", "value"}
        if extra:
            raise ctx.fail(f"condition has unknown keys {sorted(extra)}")
        name, op = node["fact"], node.get("op")
        if name not in FACTS:
            raise ctx.fail(f"unknown fact {name!r} (known: {', '.join(FACT_NAMES)})")
        ctx.facts.add(name)
        ftype = FACTS[name][0]
        if op in ("is_null", "not_null"):
            if "value" in node:
                raise ctx.fail(f"{op} takes no value")
            if op == "is_null":
                return lambda f, _n=name: f.get(_n) is None
            return lambda f, _n=name: f.get(_n) is not None
        if op not in _CMP:
            raise ctx.fail(f"unknown op {op!r} (allowed: {', '.join([*_CMP, 'is_null', 'not_null'])})")
        if "value" not in node:
            raise ctx.fail(f"condition on {name!r} needs a value")
        if op in _NUMERIC_OPS and ftype != "num":
            raise ctx.fail(f"op {op} needs a numeric fact; {name!r} is {ftype}")
        if op == "contains" and ftype != "list":
            raise ctx.fail(f"op contains needs a list fact; {name!r} is {ftype}")
        raw = node["value"]
        if op in ("in", "not_in") and not isinstance(raw, list):
            raise ctx.fail(f"op {op} needs a list value")
        if ftype == "bool" and op in ("==", "!=") and not isinstance(raw, bool):
            raise ctx.fail(f"{name!r} is a boolean; compare with true/false")
        if name == "task":
            _check_enum(raw, TASKS, ctx, "task")
        if name == "priority":
            _check_enum(raw, PRIORITIES, ctx, "priority")
        value, _ = _compile_value(raw, ctx, allow_param=False)
        cmp = _CMP[op]
        if not isinstance(raw, dict):  # a literal: a (fact, predicate) pair, the hot path
            pred = _literal_predicate(op, raw)
            leaf = _lit_leaf(name, pred)
            leaf.lit = (name, pred)  # type: ignore[attr-defined]
            if op in ("==", "in") and ftype in ("str", "bool"):
                leaf.eq = (name, frozenset(raw if isinstance(raw, list) else [raw]))  # type: ignore[attr-defined]
            return leaf

        def _leaf(f, _n=name, _v=value, _c=cmp):
            a = f.get(_n)
            if a is None:
                return False
            b = _v(f, _EMPTY_PARAMS)
            if b is None:
                return False
            try:
                return bool(_c(a, b))
            except TypeError:
                return False
        return _leaf
    if len(node) != 1:
        raise ctx.fail(f"condition must have one of fact/all/any/not, got {sorted(node)}")
    (key, arg), = node.items()
    if key in ("all", "any"):
        if not isinstance(arg, list) or not arg:
            raise ctx.fail(f"{key} needs a non-empty list")
        parts = tuple(_compile_cond(a, ctx) for a in arg)
        if all(hasattr(c, "lit") for c in parts):
            items = tuple(c.lit for c in parts)  # type: ignore[attr-defined]
            fn = _all_lits(items) if key == "all" else _any_lits(items)
        elif key == "all":
            fn = lambda f, _p=parts: all(c(f) for c in _p)  # noqa: E731
        else:
            fn = lambda f, _p=parts: any(c(f) for c in _p)  # noqa: E731
        if key == "all":  # a conjunction is guarded by any of its equality tests (used to index rules)
            guard = next((c.eq for c in parts if hasattr(c, "eq")), None)  # type: ignore[attr-defined]
            if guard is not None:
                fn.eq = guard  # type: ignore[attr-defined]
        return fn
    if key == "not":
        inner = _compile_cond(arg, ctx)
        return lambda f, _i=inner: not _i(f)
    raise ctx.fail(f"unknown condition {key!r}")


def _literal_predicate(op: str, lit: Any) -> Callable[[Any], bool]:
    """A one-argument test `fact_value OP lit` built from C-level callables where possible."""
    if op == "==":
        return functools.partial(operator.is_, lit) if isinstance(lit, bool) else functools.partial(operator.eq, lit)
    if op == "!=":
        return functools.partial(operator.is_not, lit) if isinstance(lit, bool) else functools.partial(operator.ne, lit)
    if op == "<":
        return functools.partial(operator.gt, lit)
    if op == "<=":
        return functools.partial(operator.ge, lit)
    if op == ">":
        return functools.partial(operator.lt, lit)
    if op == ">=":
        return functools.partial(operator.le, lit)
    if op == "in":
        return frozenset(lit).__contains__
    if op == "not_in":
        fs = frozenset(lit)
        return lambda a: a not in fs
    if op == "contains":
        return lambda a: lit in a
    raise ValueError(op)


def _lit_leaf(name: str, pred: Callable[[Any], bool]) -> Cond:
    def leaf(f):
        a = f.get(name)
        if a is None:
            return False
        try:
            return pred(a)
        except TypeError:
            return False
    return leaf


def _all_lits(items: tuple) -> Cond:
    def all_(f):
        g = f.get
        try:
            for n, p in items:
                a = g(n)
                if a is None or not p(a):
                    return False
        except TypeError:
            return False
        return True
    return all_


def _any_lits(items: tuple) -> Cond:
    def any_(f):
        g = f.get
        for n, p in items:
            a = g(n)
            try:
                if a is not None and p(a):
                    return True
            except TypeError:
                pass
        return False
    return any_


def _check_enum(raw: Any, allowed: tuple[str, ...], ctx: _Ctx, what: str) -> None:
    for v in raw if isinstance(raw, list) else [raw]:
        if isinstance(v, str) and v not in allowed:
            raise ctx.fail(f"unknown {what} {v!r} (allowed: {', '.join(allowed)})")


def _split_key(key: str, ctx: _Ctx, allow_all: bool = True) -> tuple[str, str]:
    if key.count(".") != 1:
        raise ctx.fail(f"key {key!r} must be '<method>.<knob>'")
    method, knob = key.split(".")
    if method == "all":
        if not allow_all:
            raise ctx.fail(f"{key!r}: name one method")
        if not any(knob in ks for ks in ctx.knobs.values()):
            raise ctx.fail(f"{key!r}: no method has a knob {knob!r}")
        return method, knob
    if method not in ctx.method_ids:
        raise ctx.fail(f"unknown method {method!r} in {key!r} (allowed: {', '.join(ctx.method_ids)})")
    if knob not in ctx.knobs[method]:
        raise ctx.fail(f"{method} has no knob {knob!r} (allowed: {', '.join(sorted(ctx.knobs[method]))})")
    return method, knob


# ----------------------------------------------------------------------------------------------- rules


@dataclass(frozen=True)
class Rule:
    id: str
    index: int
    category: str
    source: str
    quote: str
    section_path: str  # full heading path of the cited section
    says: str
    when: Cond = field(repr=False, compare=False)
    when_raw: Any = field(repr=False, compare=False)
    decision: tuple[str, float] | None = None
    prefer: tuple[tuple[str, float], ...] = ()
    avoid: tuple[tuple[str, float], ...] = ()
    infeasible: tuple[str, ...] = ()
    set_raw: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)
    notes_for: tuple[str, ...] = ()
    conflicts: tuple[tuple[str, str], ...] = ()  # (group, side)
    specificity: int = 0
    facts_used: frozenset[str] = frozenset()
    claim: str | None = None  # rules making the same claim count once per method (the largest weight)
    weights: tuple[tuple[str, float], ...] = ()  # prefer (+) and avoid (-), signed
    # `set` effects with "all" expanded: ((method, knob), const, fn, is_range, uses_facts)
    xsets: tuple = field(default=(), repr=False, compare=False)

    @property
    def advisory(self) -> bool:
        """Says something but changes no decision, score, feasibility or setting."""
        return not (self.decision or self.prefer or self.avoid or self.infeasible or self.xsets)

    def ref(self) -> dict[str, str]:
        return {"rule": self.id, "source": self.source, "says": self.says}


@dataclass(frozen=True)
class Applicability:
    id: str
    methods: tuple[str, ...]
    when: Cond = field(repr=False, compare=False)
    says: str = ""
    basis: str = ""

    def ref(self) -> dict[str, str]:
        return {"rule": self.id, "source": self.basis, "says": self.says}


@dataclass(frozen=True)
class ConflictGroup:
    id: str
    topic: str
    resolution: str
    sides: tuple[str, ...]
    methods: tuple[str, ...]


@dataclass
class RuleSet:
    path: Path
    method_ids: tuple[str, ...]
    method_order: tuple[str, ...]
    decision_order: tuple[str, ...]
    knobs: dict[str, frozenset[str]]
    rules: tuple[Rule, ...]
    applicability: tuple[Applicability, ...]
    conflicts: dict[str, ConflictGroup]
    seeds: dict[str, str]
    load_seconds: float = 0.0
    decision_index: dict[str, int] = field(default_factory=dict)
    uses_specificity: bool = False
    unguarded: tuple[Rule, ...] = ()  # rules evaluated for every scenario
    prefix_len: int = 0  # leading rules whose settings are the same for every scenario (applied at load)
    prefix_params: dict[tuple[str, str], Any] = field(default_factory=dict)
    prefix_history: dict[tuple[str, str], tuple] = field(default_factory=dict)
    guards: tuple[tuple[str, dict[Any, tuple[Rule, ...]]], ...] = ()  # fact -> value -> rules that need it
    method_index: dict[str, int] = field(default_factory=dict)

    def rule(self, rule_id: str) -> Rule:
        for r in self.rules:
            if r.id == rule_id:
                return r
        raise KeyError(rule_id)

    def counts(self) -> dict[str, dict[str, int]]:
        by_seed: dict[str, int] = {}
        by_cat: dict[str, int] = {}
        for r in self.rules:
            seed = r.source.split(" § ", 1)[0]
            by_seed[seed] = by_seed.get(seed, 0) + 1
            by_cat[r.category] = by_cat.get(r.category, 0) + 1
        return {"by_seed": dict(sorted(by_seed.items())), "by_category": by_cat}


_RULE_KEYS = {"id", "source", "quote", "when", "then", "conflict", "specificity", "claim"}
_THEN_KEYS = {"says", "decision", "prefer", "avoid", "require", "set", "notes_for"}
_ID_RE = re.compile(r"^[a-z0-9_]+(\.[a-z0-9_]+)+$")


def _methods_list(v: Any, ctx: _Ctx, what: str) -> tuple[str, ...]:
    if v == "all":
        return ctx.method_ids
    if not isinstance(v, list) or not v:
        raise ctx.fail(f"{what} must be a non-empty list of method ids or 'all'")
    for m in v:
        if m not in ctx.method_ids:
            raise ctx.fail(f"{what}: unknown method {m!r} (allowed: {', '.join(ctx.method_ids)})")
    return tuple(v)


def _weights(v: Any, ctx: _Ctx, what: str) -> tuple[tuple[str, float], ...]:
    if not isinstance(v, dict) or not v:
        raise ctx.fail(f"{what} must map method ids to positive weights")
    out = []
    for m, w in v.items():
        if m not in ctx.method_ids:
            raise ctx.fail(f"{what}: unknown method {m!r} (allowed: {', '.join(ctx.method_ids)})")
        if isinstance(w, bool) or not isinstance(w, (int, float)) or w <= 0:
            raise ctx.fail(f"{what}.{m}: weight must be a positive number (avoid weights are subtracted)")
        out.append((m, float(w)))
    return tuple(out)


def _compile_rule(raw: Any, index: int, rs_meta: dict, seeds_dir: Path) -> Rule:
    rid = raw.get("id") if isinstance(raw, dict) else None
    ctx = _Ctx(str(rid or f"#{index}"), rs_meta["method_ids"], rs_meta["knobs"])
    if not isinstance(raw, dict):
        raise ctx.fail("must be a mapping")
    unknown = set(raw) - _RULE_KEYS
    if unknown:
        raise ctx.fail(f"unknown keys {sorted(unknown)} (allowed: {sorted(_RULE_KEYS)})")
    if not isinstance(rid, str) or not _ID_RE.match(rid):
        raise ctx.fail("id must be dotted lower-case, e.g. hardware.consumer_24gb")
    category = rid.split(".", 1)[0]
    if category not in CATEGORIES:
        raise ctx.fail(f"id must start with a category ({', '.join(CATEGORIES)})")
    source, quote = raw.get("source"), raw.get("quote")
    if not isinstance(source, str) or not isinstance(quote, str) or not quote.strip():
        raise ctx.fail("needs `source` ('<seed file> § <section heading>') and a non-empty `quote`")
    seed_name = source.split(" § ", 1)[0].strip()
    if seed_name not in rs_meta["seeds"]:
        raise ctx.fail(f"cites {seed_name!r}, which is not listed under `seeds:`")
    try:
        section = seedtext.check_citation(source, quote, seeds_dir)
    except (ValueError, OSError) as e:
        raise ctx.fail(str(e)) from None
    when = _compile_cond(raw.get("when"), ctx)
    then = raw.get("then")
    if not isinstance(then, dict):
        raise ctx.fail("needs a `then` mapping")
    unknown = set(then) - _THEN_KEYS
    if unknown:
        raise ctx.fail(f"then: unknown keys {sorted(unknown)} (allowed: {sorted(_THEN_KEYS)})")
    says = then.get("says")
    if not isinstance(says, str) or not says.strip():
        raise ctx.fail("then.says must be a non-empty string")
    decision = None
    if "decision" in then:
        d = then["decision"]
        if not isinstance(d, dict) or set(d) != {"id", "strength"}:
            raise ctx.fail("then.decision must be {id: <decision>, strength: <number>}")
        if d["id"] not in rs_meta["decisions"]:
            raise ctx.fail(f"unknown decision {d['id']!r} (allowed: {', '.join(rs_meta['decisions'])})")
        if isinstance(d["strength"], bool) or not isinstance(d["strength"], (int, float)) or d["strength"] <= 0:
            raise ctx.fail("then.decision.strength must be a positive number")
        decision = (d["id"], float(d["strength"]))
    prefer = _weights(then["prefer"], ctx, "prefer") if "prefer" in then else ()
    avoid = _weights(then["avoid"], ctx, "avoid") if "avoid" in then else ()
    infeasible: tuple[str, ...] = ()
    if "require" in then:
        req = then["require"]
        if not isinstance(req, dict) or set(req) != {"infeasible"}:
            raise ctx.fail("then.require must be {infeasible: [methods] | all}")
        infeasible = _methods_list(req["infeasible"], ctx, "require.infeasible")
    sets = []
    set_raw = then.get("set") or {}
    if not isinstance(set_raw, dict):
        raise ctx.fail("then.set must map '<method>.<knob>' to a value")
    for key, val in set_raw.items():
        method, knob = _split_key(str(key), ctx)
        if isinstance(val, dict) and set(val) == {"range"}:
            lo_hi = val["range"]
            if (not isinstance(lo_hi, list) or len(lo_hi) != 2
                    or not all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in lo_hi)
                    or lo_hi[0] > lo_hi[1]):
                raise ctx.fail(f"set {key}: range must be [lo, hi] numbers with lo <= hi")
            sets.append((method, knob, tuple(lo_hi), None, True, False))
            continue
        if isinstance(val, dict) and "param" in val and method == "all":
            raise ctx.fail(f"set {key}: a value computed from {{param: ...}} must name one method")
        if not isinstance(val, dict):  # a literal (lists kept as tuples so no caller can change the rule)
            sets.append((method, knob, tuple(val) if isinstance(val, list) else val, None, False, False))
            continue
        before = set(ctx.facts)
        ctx.facts = set()
        fn, _ = _compile_value(val, ctx, allow_param=True)
        uses_facts = bool(ctx.facts)
        ctx.facts |= before
        sets.append((method, knob, None, fn, False, uses_facts))
    notes_for = _methods_list(then["notes_for"], ctx, "notes_for") if "notes_for" in then else ()
    conflicts = []
    tags = raw.get("conflict")
    for tag in (tags if isinstance(tags, list) else [tags] if tags is not None else []):
        if not isinstance(tag, dict) or set(tag) != {"group", "side"}:
            raise ctx.fail("conflict must be {group: <id>, side: <label>} (or a list of them)")
        if tag["group"] not in rs_meta["conflict_ids"]:
            raise ctx.fail(f"conflict group {tag['group']!r} is not declared under `conflicts:`")
        conflicts.append((str(tag["group"]), str(tag["side"])))
    claim = raw.get("claim")
    if claim is not None and (not isinstance(claim, str) or not re.match(r"^[a-z0-9_]+$", claim)):
        raise ctx.fail("claim must be a lower-case identifier")
    spec = raw.get("specificity", 0)
    if isinstance(spec, bool) or not isinstance(spec, int):
        raise ctx.fail("specificity must be an integer")
    xsets = []
    for method, knob, const, fn, is_range, uses_facts in sets:
        targets = [method] if method != "all" else [m for m in ctx.method_ids if knob in ctx.knobs[m]]
        xsets += [((m, knob), const, fn, is_range, uses_facts) for m in targets]
    return Rule(
        xsets=tuple(xsets), weights=(*prefer, *((m, -w) for m, w in avoid)),
        id=rid, index=index, category=category, source=source.strip(), quote=quote,
        section_path=" > ".join(section.path), says=says.strip(), when=when, when_raw=raw.get("when"),
        decision=decision, prefer=prefer, avoid=avoid, infeasible=infeasible, set_raw=set_raw,
        notes_for=notes_for, conflicts=tuple(conflicts), specificity=spec, facts_used=frozenset(ctx.facts),
        claim=claim,
    )


@functools.lru_cache(maxsize=1)
def _training_knobs() -> frozenset[str]:
    """TrainingConfig's fields (the `training` part of a config) plus the seeds' `warmup_steps`."""
    from advisor.config import TrainingConfig

    return frozenset(TrainingConfig.model_fields) | {"warmup_steps"}


_DEFAULT: dict[tuple, RuleSet] = {}


def load_rules(path: str | os.PathLike | None = None) -> RuleSet:
    """Load and validate the rules (cached per path). Raises RulesError naming the bad rule."""
    if path is None:
        key = (os.environ.get(RULES_ENV), os.environ.get(seedtext.SEEDS_ENV))
        rs = _DEFAULT.get(key)
        if rs is None:
            p = Path(key[0] or RULES_PATH)
            rs = _DEFAULT[key] = _load_rules(str(p.resolve()), str(seedtext.seeds_dir()))
        return rs
    return _load_rules(str(Path(path).resolve()), str(seedtext.seeds_dir()))


@functools.lru_cache(maxsize=8)
def _load_rules(path: str, seeds_dir: str) -> RuleSet:
    t0 = time.perf_counter()
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.load(fh, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except OSError as e:
        raise RulesError(f"cannot read rules file {path}: {e}") from e
    except yaml.YAMLError as e:
        raise RulesError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise RulesError(f"{path}: expected a mapping")
    for key in ("seeds", "methods", "method_order", "decision_order", "peft_knobs", "conflicts", "rules"):
        if key not in data:
            raise RulesError(f"{path}: missing top-level `{key}`")
    seeds = data["seeds"]
    if not isinstance(seeds, dict) or not seeds:
        raise RulesError("`seeds` must map seed file names to titles")
    sdir = Path(seeds_dir)
    for name in seeds:
        if not (sdir / name).is_file():
            raise RulesError(f"seed file {name!r} listed under `seeds:` does not exist in {sdir}")
    method_ids = tuple(data["methods"])
    if not method_ids or len(set(method_ids)) != len(method_ids):
        raise RulesError("`methods` must list distinct method ids")
    if sorted(data["method_order"]) != sorted(method_ids):
        raise RulesError("`method_order` must list every method id exactly once")
    if sorted(data["decision_order"]) != sorted(DECISIONS):
        raise RulesError(f"`decision_order` must list every decision exactly once ({', '.join(DECISIONS)})")
    training = _training_knobs()
    peft = data["peft_knobs"]
    if not isinstance(peft, dict) or set(peft) != set(method_ids):
        raise RulesError("`peft_knobs` must have an entry (list of knob names) for every method")
    knobs = {m: frozenset(training | set(peft[m] or [])) for m in method_ids}
    conflicts_raw = data["conflicts"]
    if not isinstance(conflicts_raw, dict):
        raise RulesError("`conflicts` must map group ids to {topic, resolution}")
    for gid, g in conflicts_raw.items():
        if not isinstance(g, dict) or set(g) != {"topic", "resolution"}:
            raise RulesError(f"conflict group {gid}: needs exactly `topic` and `resolution`")
    meta = {"method_ids": method_ids, "knobs": knobs, "seeds": seeds, "decisions": DECISIONS,
            "conflict_ids": set(conflicts_raw)}
    raw_rules = data["rules"]
    if not isinstance(raw_rules, list) or not raw_rules:
        raise RulesError("`rules` must be a non-empty list")
    rules = []
    seen: set[str] = set()
    for i, raw in enumerate(raw_rules):
        rule = _compile_rule(raw, i, meta, sdir)
        if rule.id in seen:
            raise RulesError(f"rule {rule.id}: duplicate id")
        seen.add(rule.id)
        rules.append(rule)
    # claims: rules repeating one claim must push each method the same way
    signs: dict[tuple[str, str], tuple[int, str]] = {}
    for r in rules:
        if r.claim is None:
            continue
        for m, w in [*r.prefer, *[(m, -w) for m, w in r.avoid]]:
            sign = 1 if w > 0 else -1
            prev = signs.setdefault((r.claim, m), (sign, r.id))
            if prev[0] != sign:
                raise RulesError(f"rule {r.id}: claim {r.claim!r} pushes {m} the other way than rule {prev[1]}")
    # conflict groups: every declared group has rules on at least two sides
    groups: dict[str, ConflictGroup] = {}
    for gid, g in conflicts_raw.items():
        members = [r for r in rules if any(c[0] == gid for c in r.conflicts)]
        sides = tuple(dict.fromkeys(s for r in members for c, s in r.conflicts if c == gid))
        if len(sides) < 2:
            raise RulesError(f"conflict group {gid}: needs rules on at least two sides, has {list(sides)}")
        methods: list[str] = []
        for r in members:
            methods += [m for m, _ in r.prefer] + [m for m, _ in r.avoid] + list(r.infeasible)
            methods += [key[0] for key, *_ in r.xsets] + list(r.notes_for)
        groups[gid] = ConflictGroup(gid, str(g["topic"]), str(g["resolution"]), sides,
                                    tuple(m for m in method_ids if m in methods))
    # applicability (engine constraints from the method implementations, not seed rules)
    apps = []
    for i, raw in enumerate(data.get("applicability") or []):
        ctx = _Ctx(str(raw.get("id") if isinstance(raw, dict) else f"applicability#{i}"), method_ids, knobs)
        if not isinstance(raw, dict) or set(raw) != {"id", "methods", "when", "says", "basis"}:
            raise ctx.fail("applicability entries need exactly id, methods, when, says, basis")
        apps.append(Applicability(raw["id"], _methods_list(raw["methods"], ctx, "methods"),
                                  _compile_cond(raw["when"], ctx), raw["says"], raw["basis"]))
    return RuleSet(
        path=Path(path), method_ids=method_ids, method_order=tuple(data["method_order"]),
        decision_order=tuple(data["decision_order"]), knobs=knobs, rules=tuple(rules),
        applicability=tuple(apps), conflicts=groups, seeds=dict(seeds), load_seconds=time.perf_counter() - t0,
        decision_index={d: i for i, d in enumerate(data["decision_order"])},
        uses_specificity=any(r.specificity for r in rules),
        **_guard_index(rules),
        **_static_prefix(rules),
        method_index={m: i for i, m in enumerate(data["method_order"])},
    )


_by_index = operator.attrgetter("index")
_by_spec = operator.attrgetter("specificity", "index")


def _static_prefix(rules: list[Rule]) -> dict[str, Any]:
    """Apply the leading rules that always fire and set fixed values (or values computed only from earlier
    suggestions) once, at load; evaluate() starts from that state."""
    if any(r.specificity for r in rules):
        return {"prefix_len": 0, "prefix_params": {}, "prefix_history": {}}
    params: dict[tuple[str, str], Any] = {}
    history: dict[tuple[str, str], tuple] = {}
    n = 0
    for r in rules:
        if r.xsets and (r.when_raw is not None or any(uses_facts for *_, uses_facts in r.xsets)):
            break
        if r.when_raw is not None and not r.xsets:
            n += 1  # a conditional rule that sets nothing does not break the prefix
            continue
        for key, const, fn, is_range, _ in r.xsets:
            if fn is not None:
                value = fn({}, params)
                if value is None:
                    continue
            elif is_range:
                lo, hi = const
                cur = params.get(key)
                value = lo if not isinstance(cur, (int, float)) or isinstance(cur, bool) else min(max(cur, lo), hi)
            else:
                value = const
            params[key] = value
            history[key] = history.get(key, ()) + ((value, r),)
        n += 1
    return {"prefix_len": n, "prefix_params": params, "prefix_history": history}


def _guard_index(rules: list[Rule]) -> dict[str, Any]:
    """Index rules whose condition requires `fact == value` (or `fact in [...]`): only the bucket for the
    scenario's value is evaluated. Order is restored by rule index afterwards."""
    unguarded = []
    index: dict[str, dict[Any, list[Rule]]] = {}
    for r in rules:
        eq = getattr(r.when, "eq", None)
        if eq is None:
            unguarded.append(r)
            continue
        name, values = eq
        for v in values:
            index.setdefault(name, {}).setdefault(v, []).append(r)
    return {"unguarded": tuple(unguarded),
            "guards": tuple((n, {v: tuple(rs) for v, rs in b.items()}) for n, b in index.items())}


def clear_cache() -> None:
    _DEFAULT.clear()
    _load_rules.cache_clear()
    seedtext.load_seed.cache_clear()


# ------------------------------------------------------------------------------------------ evaluation


class Evaluation:
    """What the rules say about one scenario.

    Computed eagerly: `decision`, `decision_scores`, `method_scores`, `ranking`, `hyperparameters`, `facts`.
    Built on first access (cached): `fired`, `decision_rules`, `method_reasons`, `infeasible`, `conflicts`,
    `notes`, `method_notes`, `hyperparameter_sources`, `overrides`. ``to_dict()`` is JSON-ready.
    Rule references are dicts ``{"rule", "source", "says"}`` (plus `category`, `weight`, `counted`,
    `strength` where they apply).
    """

    def __init__(self, *, decision, decision_scores, method_scores, ranking, hyperparameters, facts, rules, fired,
                 infeasible, uncounted, history):
        self.decision: str = decision
        self.decision_scores: dict[str, float] = decision_scores
        self.method_scores: dict[str, float] = method_scores
        self.ranking: list[str] = ranking  # feasible methods, best first
        self.hyperparameters: dict[str, dict[str, Any]] = hyperparameters  # method -> knob -> value
        self.facts: dict[str, Any] = facts
        self._rs: RuleSet = rules
        self._fired: list[Rule] = fired
        self._infeasible: dict[str, list[Rule | Applicability]] = infeasible
        self._uncounted: set[tuple[str, str]] = uncounted  # (rule id, method) repeating a counted claim
        self._history: dict[tuple[str, str], tuple[tuple[Any, Rule], ...]] = history

    def __repr__(self) -> str:
        return f"Evaluation(decision={self.decision!r}, method={self.method!r}, ranking={self.ranking!r})"

    @property
    def method(self) -> str | None:
        """The best feasible method (None when nothing is feasible)."""
        return self.ranking[0] if self.ranking else None

    @property
    def fired_ids(self) -> list[str]:
        return [r.id for r in self._fired]

    @functools.cached_property
    def fired(self) -> list[dict[str, Any]]:
        """Every rule that fired, in file order: rule, source, says, category."""
        return [{**r.ref(), "category": r.category} for r in self._fired]

    @functools.cached_property
    def decision_rules(self) -> list[dict[str, Any]]:
        """The rules behind the chosen decision, strongest first."""
        out = [dict(r.ref(), strength=r.decision[1]) for r in self._fired
               if r.decision and r.decision[0] == self.decision]
        return sorted(out, key=lambda x: -x["strength"])

    @functools.cached_property
    def method_reasons(self) -> dict[str, list[dict[str, Any]]]:
        """Per method: the rules that moved its score, with the signed weight; `counted` is false for a rule
        repeating a claim another rule already counted."""
        out: dict[str, list[dict[str, Any]]] = {m: [] for m in self._rs.method_ids}
        for r in self._fired:
            for m, w in r.weights:
                out[m].append(dict(r.ref(), weight=w, counted=(r.id, m) not in self._uncounted))
        for lst in out.values():
            lst.sort(key=lambda x: -abs(x["weight"]))
        return out

    @functools.cached_property
    def infeasible(self) -> dict[str, list[dict[str, Any]]]:
        """method -> why it cannot run here (rules, or applicability constraints of the implementation)."""
        return {m: [x.ref() for x in why] for m, why in self._infeasible.items()}

    @functools.cached_property
    def conflicts(self) -> list[dict[str, Any]]:
        """Disagreement groups with fired rules on two or more sides: group, topic, resolution, methods,
        static (every rule involved fires for every scenario), sides [{side, rules}]."""
        by_group: dict[str, dict[str, list[Rule]]] = {}
        for r in self._fired:
            for gid, side in r.conflicts:
                by_group.setdefault(gid, {}).setdefault(side, []).append(r)
        out = []
        for gid, sides in by_group.items():
            if len(sides) < 2:
                continue
            g = self._rs.conflicts[gid]
            out.append({
                "group": gid, "topic": g.topic, "resolution": g.resolution, "methods": list(g.methods),
                "static": all(r.when_raw is None for rr in sides.values() for r in rr),
                "sides": [{"side": sd, "rules": [r.ref() for r in rr]} for sd, rr in sides.items()],
            })
        return out

    @functools.cached_property
    def notes(self) -> list[dict[str, Any]]:
        """Advisory rules that fired (they change no score or setting)."""
        return [r.ref() for r in self._fired if r.advisory and not r.notes_for]

    @functools.cached_property
    def method_notes(self) -> dict[str, list[dict[str, Any]]]:
        """Remarks that matter only if that method is chosen."""
        out: dict[str, list[dict[str, Any]]] = {}
        for r in self._fired:
            for m in r.notes_for:
                out.setdefault(m, []).append(r.ref())
        return out

    @functools.cached_property
    def hyperparameter_sources(self) -> dict[str, dict[str, dict[str, Any]]]:
        """method -> knob -> {value, rule, source}: the rule whose value stands."""
        out: dict[str, dict[str, dict[str, Any]]] = {}
        for (m, knob), h in self._history.items():
            value, rule = h[-1]
            value = list(value) if type(value) is tuple else value
            out.setdefault(m, {})[knob] = {"value": value, "rule": rule.id, "source": rule.source}
        return out

    @functools.cached_property
    def overrides(self) -> list[dict[str, Any]]:
        """Each suggestion whose value replaced a different value set by an earlier (less specific) rule."""
        out = []
        for (m, knob), h in self._history.items():
            if len(h) < 2:
                continue
            value, rule = h[-1]
            replaced = [{"value": _public(v), "rule": rr.id, "source": rr.source} for v, rr in h[:-1]
                        if v != value and rr.id != rule.id]
            if replaced:
                out.append({"key": f"{m}.{knob}", "value": _public(value), "rule": rule.id, "source": rule.source,
                            "replaced": replaced})
        return out

    def suggestions_for(self, method: str) -> dict[str, Any]:
        """The merged hyperparameter suggestions for one method (peft knobs and training knobs together)."""
        return dict(self.hyperparameters.get(method, {}))

    def config_for(self, method: str, total_steps: int | None = None) -> dict[str, dict[str, Any]]:
        """The suggestions for `method` split like a config: ``{"peft": {...}, "training": {...}}``, to merge over
        the method's defaults. The seeds give warmup in steps: with `total_steps` it becomes
        ``training.warmup_ratio`` (steps / total, at most 0.5); without, it stays ``training.warmup_steps``."""
        peft_knobs = self._rs.knobs[method] - _training_knobs()
        peft, training = {}, {}
        for knob, value in self.hyperparameters.get(method, {}).items():
            (peft if knob in peft_knobs else training)[knob] = list(value) if isinstance(value, list) else value
        if total_steps and "warmup_steps" in training:
            training["warmup_ratio"] = round(min(0.5, training.pop("warmup_steps") / max(1, total_steps)), 4)
        return {"peft": peft, "training": training}

    def conflicts_for(self, method: str | None = None, include_static: bool = True) -> list[dict[str, Any]]:
        """Conflicts about the decision plus those touching `method` (all when None); `include_static=False`
        drops the disagreements that hold for every scenario (e.g. alpha = r vs 2r)."""
        out = [c for c in self.conflicts if include_static or not c["static"]]
        if method is None:
            return out
        return [c for c in out if not c["methods"] or method in c["methods"]]

    def to_dict(self) -> dict[str, Any]:
        return {
            "decision": self.decision, "decision_scores": self.decision_scores, "decision_rules": self.decision_rules,
            "method": self.method, "ranking": self.ranking, "method_scores": self.method_scores,
            "method_reasons": self.method_reasons, "infeasible": self.infeasible,
            "hyperparameters": self.hyperparameters, "hyperparameter_sources": self.hyperparameter_sources,
            "overrides": self.overrides, "conflicts": self.conflicts, "notes": self.notes,
            "method_notes": self.method_notes, "fired": self.fired,
        }


def _public(v: Any) -> Any:
    return list(v) if type(v) is tuple else v




def evaluate(facts: Mapping[str, Any], rules: RuleSet | None = None) -> Evaluation:
    """Run every rule over `facts` (a dict from :func:`facts_from_scenario`; missing keys count as unknown)."""
    rs = rules if rules is not None else load_rules()
    f = dict(_BLANK_FACTS)
    f.update(facts)
    methods = rs.method_ids

    fired = [r for r in rs.unguarded if r.when(f)]
    n_unguarded = len(fired)
    for name, buckets in rs.guards:
        v = f.get(name)
        if v is not None:
            cand = buckets.get(v)
            if cand:
                fired += [r for r in cand if r.when(f)]
    if len(fired) != n_unguarded:
        fired.sort(key=_by_index)

    # decision (largest total strength; ties by decision_order) and method scores (sum of weights; rules that
    # share a `claim` count once per method, the largest weight); infeasible methods
    dscore = dict.fromkeys(rs.decision_order, 0.0)
    score = dict.fromkeys(methods, 0.0)
    infeasible: dict[str, list[Any]] = {}
    best: dict[tuple[str, str], tuple[float, str]] = {}
    uncounted: set[tuple[str, str]] = set()
    for r in fired:
        if r.decision:
            dscore[r.decision[0]] += r.decision[1]
        if r.weights:
            claim = r.claim
            for m, w in r.weights:
                if claim is None:
                    score[m] += w
                    continue
                prev = best.get((claim, m))
                if prev is None:
                    best[(claim, m)] = (w, r.id)
                    score[m] += w
                elif abs(w) > abs(prev[0]):
                    uncounted.add((prev[1], m))
                    score[m] += w - prev[0]
                    best[(claim, m)] = (w, r.id)
                else:
                    uncounted.add((r.id, m))
        if r.infeasible:
            for m in r.infeasible:
                infeasible.setdefault(m, []).append(r)
    for a in rs.applicability:
        if a.when(f):
            for m in a.methods:
                infeasible.setdefault(m, []).append(a)
    didx = rs.decision_index
    decision = max(rs.decision_order, key=lambda d: (dscore[d], -didx[d]))
    if dscore[decision] == 0:
        decision = "fine_tune"
    midx = rs.method_index
    ranking = sorted((m for m in methods if m not in infeasible), key=lambda m: (-score[m], midx[m]))

    # hyperparameters: one pass in override order; {param: ...} reads what earlier rules set. The leading
    # unconditional rules with fixed values were applied once at load (rs.prefix_params / prefix_history).
    params: dict[tuple[str, str], Any] = dict(rs.prefix_params)
    history: dict[tuple[str, str], tuple[tuple[Any, Rule], ...]] = dict(rs.prefix_history)
    ordered = fired if not rs.uses_specificity else sorted(fired, key=_by_spec)
    start = rs.prefix_len
    for r in ordered:
        if r.index < start or not r.xsets:
            continue
        for key, const, fn, is_range, _ in r.xsets:
            if fn is not None:
                value = fn(f, params)
                if value is None:
                    continue
            elif is_range:
                lo, hi = const
                cur = params.get(key)
                value = lo if not isinstance(cur, (int, float)) or isinstance(cur, bool) else min(max(cur, lo), hi)
            else:
                value = const
            params[key] = value
            history[key] = history.get(key, ()) + ((value, r),)
    hyper: dict[str, dict[str, Any]] = {m: {} for m in methods}
    for (m, knob), value in params.items():
        hyper[m][knob] = list(value) if type(value) is tuple else value

    return Evaluation(
        decision=decision, decision_scores=dscore, method_scores=score, ranking=ranking, hyperparameters=hyper,
        facts=f, rules=rs, fired=fired, infeasible=infeasible, uncounted=uncounted, history=history,
    )


# ------------------------------------------------------------------------------------------------ facts

_BIAS_CACHE: dict[str, bool] = {}


def _has_biases(resolved) -> bool | None:
    """Whether the architecture has any `.bias` parameter (what BitFit trains); built on meta, cached."""
    try:
        key = resolved.cache_key()
    except Exception:  # noqa: BLE001
        return None
    if key not in _BIAS_CACHE:
        try:
            model = resolved.build_meta()
            _BIAS_CACHE[key] = any(n.endswith(".bias") or n == "bias" for n, _ in model.named_parameters())
        except Exception:  # noqa: BLE001 - an unbuildable config only loses this fact
            return None
    return _BIAS_CACHE[key]


def nominal_gb(memory_gib: float | None) -> float | None:
    if memory_gib is None:
        return None
    for s in _NOMINAL_SIZES:
        if memory_gib <= s + 0.05:
            return float(s)
    return float(math.ceil(memory_gib))


def facts_from_scenario(
    scenario: Scenario | Mapping[str, Any], resolved_model=None, hardware_target=None
) -> dict[str, Any]:
    """Resolve the scenario's model and hardware into the flat facts the rules read (see FACTS).

    Raises AdvisorInputError naming the field (model, hardware.gpu, dataset.num_examples ...). Pass
    `resolved_model` (a ResolvedModel) / `hardware_target` (a HardwareTarget) when the caller has them.
    """
    from advisor.catalog.models import resolve_model
    from advisor.hardware import resolve_hardware

    sc = parse_scenario(scenario) if not isinstance(scenario, Scenario) else scenario
    rm = resolved_model if resolved_model is not None else resolve_model(sc.model)
    hw = hardware_target if hardware_target is not None else resolve_hardware(sc.hardware)
    if sc.dataset.num_examples is None:
        raise AdvisorInputError("dataset.num_examples", "required: give the count, or profile dataset.path first")

    n = rm.num_params()
    f: dict[str, Any] = dict(_BLANK_FACTS)
    f.update(
        model_id=rm.id, model_type=rm.model_type, model_family=rm.family, kind=rm.kind,
        is_encoder_decoder=rm.kind == "seq2seq", params=n, params_b=n / 1e9, num_layers=rm.num_layers,
        hidden_size=rm.hidden_size, model_max_positions=rm.max_positions, has_biases=_has_biases(rm),
        weights_fp16_gib=n * 2 / 2**30, weights_4bit_gib=n * 0.5 / 2**30,
    )
    gpu = hw.gpu
    if hw.has_gpu:
        reported = float(gpu.memory_gib) if gpu is not None and sc.hardware.vram_gib is None else hw.memory_gib
        if gpu is None and hw.local:  # "auto" on a card missing from the catalog: reported = usable + 0.5
            reported = hw.memory_gib + 0.5
        tier = gpu.tier if gpu is not None else "unknown"
        nominal = float(sc.hardware.vram_gib) if sc.hardware.vram_gib is not None else nominal_gb(reported)
        f.update(
            has_gpu=True, gpu_name=hw.name, gpu_id=gpu.id if gpu else None, gpu_vendor=gpu.vendor if gpu else None,
            gpu_architecture=gpu.architecture if gpu else None, gpu_tier=tier, gpu_count=hw.count,
            multi_gpu=hw.count > 1, gpu_memory_gib=reported, gpu_usable_memory_gib=hw.memory_gib,
            gpu_nominal_gb=nominal, total_gpu_memory_gib=reported * hw.count,
            total_gpu_usable_memory_gib=hw.memory_gib * hw.count,
            bf16_supported=gpu.bf16_supported if gpu else None, gpu_usd_per_hour=gpu.usd_per_hour if gpu else None,
        )
    else:
        f.update(has_gpu=False, gpu_name=hw.name, gpu_tier="none", gpu_count=0, multi_gpu=False,
                 gpu_memory_gib=0.0, gpu_usable_memory_gib=0.0, gpu_nominal_gb=0.0, total_gpu_memory_gib=0.0,
                 total_gpu_usable_memory_gib=0.0)
    ds = sc.dataset
    f.update(
        num_examples=ds.num_examples, avg_tokens=ds.avg_tokens, max_tokens=ds.max_tokens,
        dataset_tokens=ds.num_examples * ds.avg_tokens if ds.avg_tokens is not None else None,
        task=sc.task, priority=sc.priority, budget_max_usd=sc.budget.max_usd, budget_max_hours=sc.budget.max_hours,
    )
    ctx = sc.context.model_dump()
    for k, v in ctx.items():
        f[k] = v
    return f


def evaluate_scenario(scenario: Scenario | Mapping[str, Any], **kw) -> Evaluation:
    """facts_from_scenario + evaluate."""
    return evaluate(facts_from_scenario(scenario, **kw))
