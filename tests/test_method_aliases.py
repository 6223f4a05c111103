"""Method names users give that are a registered method with settings ("dora" is LoRA with use_dora, "lisa" is
freeze tuning's worst interval, "loha" is method peft with LOHA): the estimate is the explicit request's, the answer
says how the name was read, the request's own settings win, jobs read the same names, unknown names list them."""

from __future__ import annotations

import pytest

from advisor.errors import AdvisorInputError
from advisor.estimator.service import run_estimate
from advisor.schemas import EstimateRequest


def _estimate(model, method, config=None):
    return run_estimate(EstimateRequest.model_validate({
        "model": str(model), "hardware": {"gpu": "a100-80gb"}, "method": method,
        "config": {**(config or {}), "training": {"per_device_train_batch_size": 2, "max_seq_length": 64,
                                                  **(config or {}).get("training", {})}}}))


LISA = {"extra_modules": ["embed_tokens", "norm", "lm_head"]}


@pytest.mark.parametrize("alias, own, method, config", [
    ("DoRA", None, "lora", {"peft": {"use_dora": True}}),
    ("qdora", None, "qlora", {"peft": {"use_dora": True}}),
    ("LoRA-FA", None, "lora", {"training": {"optim": "lorafa"}}),
    # LISA's 2 active blocks by default; the tiny model has 2, so one here
    ("lisa", {"peft": {"trainable_layers": -1}}, "freeze", {"peft": {"trainable_layers": -1, **LISA}}),
    ("LoHa", None, "peft", {"peft": {"peft_type": "LOHA"}}),
    ("full-parameter", None, "full", {}),
])
def test_an_alias_estimates_what_the_explicit_request_does_and_says_so(tiny_dirs, alias, own, method, config):
    model = tiny_dirs["llama"]
    by_alias, explicit = _estimate(model, alias, own), _estimate(model, method, config)
    assert by_alias["method"] == explicit["method"] == method
    assert (by_alias["peak_bytes"], by_alias["trainable_params"]) == (explicit["peak_bytes"], explicit["trainable_params"])
    assert any(f"method {alias!r} is read as {method!r}" in n for n in by_alias["notes"])


def test_lisa_is_its_worst_interval_of_two_blocks_with_embeddings_and_head():
    from advisor.methods import resolve_method_alias

    method, config, note = resolve_method_alias("LISA", None)
    assert method == "freeze" and config["peft"] == {"trainable_layers": -2, **LISA} and "worst interval" in note


def test_the_requests_own_settings_win_over_what_the_name_implies(tiny_dirs):
    model = tiny_dirs["llama"]
    r32 = _estimate(model, "dora", {"peft": {"r": 32}})
    r8 = _estimate(model, "dora", {"peft": {"r": 8}})
    assert r32["trainable_params"] > r8["trainable_params"]
    explicit = _estimate(model, "lora", {"peft": {"r": 32, "use_dora": True}})
    assert r32["trainable_params"] == explicit["trainable_params"]


def test_a_registered_id_typed_with_capitals_or_dashes_is_that_method(tiny_dirs):
    assert _estimate(tiny_dirs["llama"], "Prompt-Tuning")["method"] == "prompt_tuning"


def test_an_unknown_method_lists_the_ids_and_the_names_read_as_them(tiny_dirs):
    with pytest.raises(AdvisorInputError) as err:
        _estimate(tiny_dirs["llama"], "lora-xl")
    assert err.value.field == "method"
    assert {"lora", "freeze", "llama_pro", "dora", "lisa", "loha"} <= set(err.value.allowed)


def test_jobs_read_the_same_names(tiny_dirs, tmp_path):
    from advisor.demo import write_datasets
    from advisor.train import normalize_job

    data = write_datasets(tmp_path / "data", n=8)
    job = normalize_job({"model": str(tiny_dirs["llama"]), "method": "DoRA", "max_steps": 1,
                         "dataset": {"path": str(data["alpaca"]), "format": "auto"}})
    assert job["method"] == "lora" and job["config"]["peft"]["use_dora"] is True
