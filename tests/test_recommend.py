"""The recommender on scenarios taken from the seeds' decision trees, through Python, REST (real uvicorn) and CLI.

Fitted estimator coefficients are shared by the tests of this module (one cache directory), so each architecture
and method is fitted once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import pytest
from conftest import AdvisorServer

from advisor.errors import AdvisorInputError

ADVISOR = [sys.executable, "-m", "advisor.cli"]
L7 = "meta-llama/Llama-2-7b-hf"
DATA = {"num_examples": 2000, "avg_tokens": 512, "max_tokens": 1024}


@pytest.fixture(scope="module", autouse=True)
def shared_cache(tmp_path_factory):
    cache = tmp_path_factory.mktemp("recommend-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ADVISOR_CACHE_DIR", str(cache))
        yield cache


def rec(**scenario):
    from advisor.recommend import recommend
    from advisor.settings import get_settings

    get_settings.cache_clear()
    return recommend(scenario)


def rejected(r: dict) -> dict[str, str]:
    return {x["method"]: x["why"] for x in r["rejected"]}


def assert_cited(reasons: list[dict]) -> None:
    assert reasons, "reasons is never empty"
    for reason in reasons:
        assert reason["source"] == "estimator" or (".txt § " in reason["source"]), reason
        assert reason["rule"] and reason["says"]


def test_13b_on_a_24gb_card_is_qlora_and_lora_is_ruled_out_by_its_weights():
    r = rec(model="meta-llama/Llama-2-13b-hf", hardware={"gpu": "RTX 4090"}, dataset=DATA)
    assert r["decision"] == "fine_tune" and r["method"] == "qlora"
    assert r["config"]["quantization"]["load_in_4bit"] is True
    est = r["estimate"]
    assert est["fits"] is True and est["peak_vram_gib"] <= r["hardware"]["usable_memory_gib"]
    assert abs(sum(est["breakdown_gib"].values()) - est["peak_vram_gib"]) < 0.02
    assert "lora" in rejected(r) and "16-bit weights" in rejected(r)["lora"]
    assert_cited(r["reasons"])
    assert any(x["rule"] == "estimator.fits" for x in r["reasons"])
    # the 24 GB QLoRA-vs-LoRA disagreement touched this answer and is stated
    assert any("24 GB consumer GPU" in n for n in r["notes"]), r["notes"]


def test_7b_on_a_24gb_card_settles_the_disagreement_with_the_estimate():
    r = rec(model=L7, hardware={"gpu": "4090"}, dataset=DATA, task="domain_adaptation")
    assert r["method"] in ("lora", "qlora")
    note = next(n for n in r["notes"] if "24 GB consumer GPU" in n)
    assert "Estimator:" in note and "lora" in note  # the numbers that settled it
    # full fine-tuning cannot fit on one 24 GB card: rejected with the numbers
    assert "full" in rejected(r) and "GiB" in rejected(r)["full"]
    numbers = next(x for x in r["rejected"] if x["method"] == "full")["numbers"]
    assert numbers["peak_vram_gib_at_micro_batch_1"] > numbers["usable_gib"]
    # the alternatives carry their own config and estimate and say why they are not first
    assert r["alternatives"] and all(a["config"]["method"] == a["method"] and a["why_not_first"]
                                     for a in r["alternatives"])
    assert [c["method"] for c in r["ranking"]][0] == r["method"]
    # checkpointing only when needed: on when the suggested micro-batch would not fit without it
    t = r["config"]["training"]
    assert t["per_device_train_batch_size"] <= r["estimate"]["max_micro_batch"]
    assert r["estimate"]["effective_batch"] == t["per_device_train_batch_size"] * t["gradient_accumulation_steps"]
    assert len(r["fired"]) >= 10 and all({"rule", "source", "says"} <= set(f) for f in r["fired"])


def test_a_pick_close_to_the_limit_says_so():
    """When the chosen micro-batch fits at the estimate but not at its band's top, the answer says so and how to
    settle it; with room to spare it does not."""
    tight = rec(model=L7, hardware={"vram_gib": 39.6}, dataset=DATA)
    est = tight["estimate"]
    assert est["peak_vram_gib"] <= 39.6 < est["peak_vram_high_gib"]
    says = next(x["says"] for x in tight["reasons"] if x["rule"] == "estimator.borderline")
    assert "--exact" in says and f"micro-batch {est['micro_batch'] - 1}" in says
    roomy = rec(model=L7, hardware={"vram_gib": 45.0}, dataset=DATA)
    assert not any(x["rule"] == "estimator.borderline" for x in roomy["reasons"])


def test_70b_on_one_80gb_card_needs_4bit():
    r = rec(model="meta-llama/Llama-2-70b-hf", hardware={"gpu": "A100-80GB"}, dataset=DATA)
    assert r["method"] == "qlora" and r["estimate"]["fits"] is True
    assert {"full", "lora"} <= set(rejected(r))


def test_fifty_examples_is_not_a_fine_tuning_job():
    r = rec(model=L7, hardware={"gpu": "A100-80GB"}, dataset={"num_examples": 50})
    assert r["decision"] == "few_shot_prompting"
    assert r["method"] is None and r["config"] is None and r["estimate"] is None
    assert_cited(r["reasons"])
    assert any("100" in x["says"] for x in r["reasons"])


def test_no_gpu_points_to_a_managed_api_and_changing_facts_to_rag():
    r = rec(model=L7, hardware={"gpu": "none"}, dataset={"num_examples": 5000})
    assert r["decision"] == "managed_finetune_api" and r["method"] is None
    assert_cited(r["reasons"])
    r = rec(model=L7, hardware={"gpu": "A100-80GB"}, dataset={"num_examples": 5000},
            context={"knowledge_changes_often": True})
    assert r["decision"] == "rag" and r["config"] is None
    assert_cited(r["reasons"])


def test_t4_trains_in_fp16_with_a_smaller_micro_batch_that_keeps_the_effective_batch():
    r = rec(model=L7, hardware={"gpu": "T4"}, dataset=DATA)
    assert r["decision"] == "fine_tune" and r["method"]
    t = r["config"]["training"]
    assert t["fp16"] is True and t["bf16"] is False
    if r["config"].get("quantization"):
        assert r["config"]["quantization"]["bnb_4bit_compute_dtype"] == "float16"
    assert any("bfloat16" in n for n in r["notes"])
    assert r["estimate"]["fits"] is True
    assert t["per_device_train_batch_size"] * t["gradient_accumulation_steps"] >= 16


def test_math_widens_lora_to_the_mlp_and_four_domains_choose_experts():
    r = rec(model=L7, hardware={"gpu": "A100-80GB"}, dataset=DATA, task="math")
    assert r["method"] == "lora"
    assert {"gate_proj", "up_proj", "down_proj"} <= set(r["config"]["peft"]["target_modules"])
    r = rec(model=L7, hardware={"gpu": "A100-80GB"}, dataset={**DATA, "num_examples": 20000}, task="multi_domain",
            context={"num_domains": 4})
    assert r["method"] == "molora" and r["config"]["peft"]["num_experts"] == 4


def test_long_documents_get_longlora_with_rope_scaling_at_their_full_length():
    """32K-token documents on Llama-2-7B (4,096 positions): LongLoRA trains them untruncated with linear RoPE scaling
    × 8 (the LongLoRA paper's 4K → 32K setting), estimated at 32,768 tokens; the config estimates and exports as is."""
    from advisor.estimator.fast import fast_estimate
    from advisor.schemas import EstimateRequest

    data = {"num_examples": 3000, "avg_tokens": 20000, "max_tokens": 32768}
    r = rec(model=L7, hardware={"gpu": "A100-80GB"}, dataset=data, task="long_context")
    assert r["method"] == "longlora", (r["method"], rejected(r))
    t = r["config"]["training"]
    assert t["rope_scaling"] == {"type": "linear", "factor": 8.0} and t["max_seq_length"] == 32768
    assert r["estimate"]["seq_len"] == 32768 and r["estimate"]["fits"]
    assert any("× 8" in n and "32768 positions" in n for n in r["notes"]), r["notes"]
    est = fast_estimate(EstimateRequest.model_validate(
        {"model": L7, "hardware": {"gpu": "A100-80GB"}, "method": "longlora", "config": r["config"]}))
    assert est["peak_vram_gib"] == pytest.approx(r["estimate"]["peak_vram_gib"], rel=0.02)
    # the same length without the scaling is refused, naming the key that allows it
    cfg = {**r["config"], "training": {**t, "rope_scaling": None}}
    with pytest.raises(AdvisorInputError) as err:
        fast_estimate(EstimateRequest.model_validate(
            {"model": L7, "hardware": {"gpu": "A100-80GB"}, "method": "longlora", "config": cfg}))
    assert err.value.field == "config.training.max_seq_length" and "rope_scaling" in err.value.message
    # other methods still truncate to the model's positions
    for alt in r["alternatives"]:
        if alt["method"] != "longlora":
            assert alt["config"]["training"]["max_seq_length"] == 4096


def test_priority_and_budget_change_the_answer_with_numbers():
    base = dict(model=L7, hardware={"gpu": "A100-80GB"}, dataset=DATA)
    cheap = rec(**base, priority="cost")
    best = rec(**base, priority="quality")
    assert cheap["estimate"]["cost_usd"] <= best["estimate"]["cost_usd"]
    scores = [c["score"] for c in cheap["ranking"]]
    assert scores == sorted(scores, reverse=True)
    broke = rec(**base, budget={"max_usd": 0.01})
    assert broke["method"] is None
    assert all("over budget" in why for m, why in rejected(broke).items() if m in [c["method"] for c in cheap["ranking"]])


def test_multi_gpu_picks_a_sharding_strategy_when_replicas_do_not_fit():
    r = rec(model=L7, hardware={"gpu": "A100-80GB", "count": 4}, dataset=DATA, priority="quality",
            context={"num_tasks": 1})
    est = r["estimate"]
    assert est["strategy"] in ("ddp", "zero2", "zero3", "zero2_offload", "zero3_offload")
    assert est["per_strategy_gib"]["zero3"] <= est["per_strategy_gib"]["ddp"]
    assert est["fits"] is True


def test_a_dataset_file_is_profiled_with_the_models_tokenizer(tiny_dirs, tmp_path):
    from advisor.demo import write_datasets
    from transformers import AutoTokenizer

    path = write_datasets(tmp_path / "data", n=150)["alpaca"]
    r = rec(model=str(tiny_dirs["llama"]), hardware={"gpu": "RTX 4090"}, dataset={"path": str(path)},
            context={"prompting_tried": True})
    prof = r["dataset_profile"]
    assert prof["num_examples"] == 150 and prof["format"] == "alpaca"
    assert "model's tokenizer" in prof["tokenizer"]
    from advisor.train.data import encode_row, read_rows

    tok = AutoTokenizer.from_pretrained(tiny_dirs["llama"])  # what the trainer feeds, row by row
    longest = max(len(encode_row(row, "alpaca", tok, "causal").input_ids) for row in read_rows(path))
    assert longest > 10
    assert prof["max_tokens"] == longest
    assert r["scenario"]["dataset"]["num_examples"] == 150 and r["decision"] == "fine_tune"
    assert r["config"]["training"]["max_seq_length"] == min(longest, 2048)


def test_t5_summarizing_a_file_gets_an_encoder_decoder_method_with_the_decoder_at_the_longest_target(tiny_dirs,
                                                                                                    tmp_path):
    """An encoder-decoder gets a method that applies to it (LongLoRA's shifted attention does not: rejected). The
    profile reports the targets apart, and the recommended config trains and is estimated with the decoder at the
    longest target (max_target_length), not at the source length."""
    import json

    from advisor.train.data import encode_row, read_rows
    from transformers import AutoTokenizer

    # a classifier: long sources, one-word targets
    words = "the model reads a long review of a product and decides whether the customer was happy".split()
    path = tmp_path / "classify.jsonl"
    path.write_text("".join(json.dumps({"prompt": " ".join(words * (2 + i % 5)), "completion": ("yes", "no")[i % 2]})
                            + "\n" for i in range(150)))
    r = rec(model=str(tiny_dirs["t5"]), hardware={"gpu": "RTX 4090"}, dataset={"path": str(path)},
            task="summarization", context={"prompting_tried": True})
    assert r["decision"] == "fine_tune" and r["method"] != "longlora" and "longlora" in rejected(r)
    tok = AutoTokenizer.from_pretrained(tiny_dirs["t5"])
    pairs = [encode_row(row, "completion", tok, "seq2seq") for row in read_rows(path)]
    longest_target = max(len(e.labels) for e in pairs)
    assert r["dataset_profile"]["max_target_tokens"] == longest_target
    assert longest_target * 4 < r["dataset_profile"]["max_tokens"] == max(len(e.input_ids) for e in pairs)
    assert r["decision"] == "fine_tune"
    assert r["config"]["training"]["max_target_length"] == longest_target
    assert r["config"]["training"]["max_seq_length"] == r["dataset_profile"]["max_tokens"]
    # the answer's estimate is the estimate of that config, and the default (target = source length) is larger
    from advisor.estimator.fast import fast_estimate
    from advisor.schemas import EstimateRequest

    req = {"model": str(tiny_dirs["t5"]), "hardware": {"gpu": "RTX 4090"}, "method": r["method"], "config": r["config"]}
    assert fast_estimate(EstimateRequest.model_validate(req))["peak_bytes"] == r["estimate"]["peak_bytes"]
    req["config"] = {**r["config"], "training": {**r["config"]["training"], "max_target_length": None}}
    assert fast_estimate(EstimateRequest.model_validate(req))["peak_bytes"] > r["estimate"]["peak_bytes"]


@pytest.mark.parametrize("scenario,field", [
    ({"model": L7, "hardware": {"gpu": "RTX 9999"}, "dataset": DATA}, "hardware.gpu"),
    ({"model": L7, "hardware": {"gpu": "4090", "count": -1}, "dataset": DATA}, "hardware.count"),
    # memory given beside a card: the part of it this run may use, never more than it has; never beside no GPU
    ({"model": L7, "hardware": {"gpu": "4090", "vram_gib": 80}, "dataset": DATA}, "hardware.vram_gib"),
    ({"model": L7, "hardware": {"gpu": "none", "vram_gib": 16}, "dataset": DATA}, "hardware.vram_gib"),
    ({"model": L7, "hardware": {"gpu": "4090"}, "dataset": {"num_examples": 10, "avg_tokens": 900,
                                                             "max_tokens": 100}}, "dataset.avg_tokens"),
    ({"model": L7, "hardware": {"gpu": "4090"}, "dataset": DATA, "task": "poetry"}, "task"),
    ({"model": L7, "hardware": {"gpu": "4090"}, "dataset": DATA, "priority": "fastest"}, "priority"),
    ({"model": L7, "hardware": {"gpu": "4090"}}, "dataset"),
    ({"model": "no-such/model-xyz", "hardware": {"gpu": "4090"}, "dataset": DATA}, "model"),
])
def test_bad_scenarios_name_the_field(scenario, field):
    from advisor.recommend import recommend

    with pytest.raises(AdvisorInputError) as err:
        recommend(scenario)
    assert err.value.field == field, err.value.message


# ------------------------------------------------------------------------------------ REST and CLI
@pytest.fixture(scope="module")
def server(tmp_path_factory, shared_cache):
    root = tmp_path_factory.mktemp("srv") / "var"
    srv = AdvisorServer(root, {"ADVISOR_CACHE_DIR": str(shared_cache)}).start(timeout=90)
    yield srv.url, root
    srv.stop()


def _same(a: dict, b: dict) -> bool:
    drop = ("elapsed_ms",)
    return {k: v for k, v in a.items() if k not in drop} == {k: v for k, v in b.items() if k not in drop}


def test_rest_cli_and_python_give_the_same_answer(server, tmp_path):
    base, _ = server
    scenario = {"model": "meta-llama/Llama-2-13b-hf", "hardware": {"gpu": "RTX 4090"}, "dataset": DATA}
    r1 = httpx.post(f"{base}/v1/recommend", json=scenario, timeout=300)
    assert r1.status_code == 200, r1.text
    assert r1.headers["x-advisor-cache"] == "miss"
    r2 = httpx.post(f"{base}/v1/recommend", json=scenario, timeout=60)
    assert r2.headers["x-advisor-cache"] == "hit" and _same(r1.json(), r2.json())
    assert "/v1/recommend" in httpx.get(f"{base}/openapi.json").json()["paths"]

    path = tmp_path / "scenario.json"
    path.write_text(json.dumps(scenario))
    cli = subprocess.run([*ADVISOR, "recommend", "--file", str(path), "--json"], capture_output=True, text=True,
                         timeout=300)
    assert cli.returncode == 0, cli.stderr[-2000:]
    assert _same(json.loads(cli.stdout), r1.json())

    report = subprocess.run([*ADVISOR, "recommend", "--model", "meta-llama/Llama-2-13b-hf", "--gpu", "4090",
                             "--examples", "2000", "--avg-tokens", "512", "--max-tokens", "1024"],
                            capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "160"})
    assert report.returncode == 0, report.stderr[-2000:]
    for part in ("qlora", "Why", "Estimate", "Rejected", "§"):
        assert part in report.stdout


def test_rest_and_cli_refuse_bad_input_naming_the_field(server, tmp_path):
    base, root = server
    r = httpx.post(f"{base}/v1/recommend", json={"model": L7, "hardware": {"gpu": "RTX 9999"}, "dataset": DATA},
                   timeout=60)
    assert r.status_code == 422 and r.json()["field"] == "hardware.gpu"
    r = httpx.post(f"{base}/v1/recommend", json={"model": L7, "hardware": {"gpu": "4090"},
                                                 "dataset": {"path": "/etc/passwd"}}, timeout=60)
    assert r.status_code == 422 and r.json()["field"] == "dataset.path"
    r = httpx.post(f"{base}/v1/recommend", json=[1, 2], timeout=60)
    assert r.status_code == 422
    cli = subprocess.run([*ADVISOR, "recommend", "--model", L7, "--gpu", "4090", "--examples", "100",
                          "--avg-tokens", "900", "--max-tokens", "10"], capture_output=True, text=True, timeout=120)
    assert cli.returncode == 2 and "avg_tokens" in cli.stderr
    assert httpx.get(f"{base}/healthz").json()["status"] == "ok"  # nothing else affected


def test_parallel_fits_leave_nothing_to_fit_and_equal_a_fit_in_process(tiny_dirs, tmp_path, monkeypatch):
    """ADVISOR_FIT_WORKERS=2: the candidates' fits run two at a time in processes forked from the warm server, before
    the candidates are configured; configuring them then fits nothing in this process, and the chosen config's
    estimate equals one fitted here from scratch."""
    from advisor.estimator import coefficients
    from advisor.estimator.fast import fast_estimate
    from advisor.recommend.service import _FITTED
    from advisor.schemas import EstimateRequest
    from advisor.settings import get_settings

    hardware = {"gpu": "RTX 4090"}
    in_process = []
    original = coefficients._fit
    monkeypatch.setattr(coefficients, "_fit", lambda *a, **k: in_process.append(a[1].method) or original(*a, **k))
    monkeypatch.setenv("ADVISOR_FIT_WORKERS", "2")
    monkeypatch.setenv("ADVISOR_FIT_CACHE_DIR", str(tmp_path / "parallel"))
    coefficients.clear_memo()
    _FITTED.clear()
    r = rec(model=str(tiny_dirs["llama"]), hardware=hardware,
            dataset={"num_examples": 2000, "avg_tokens": 100, "max_tokens": 200})
    forked = sorted((tmp_path / "parallel").glob("*.json"))
    assert in_process == [] and len(forked) >= 5 and r["decision"] == "fine_tune"
    monkeypatch.setenv("ADVISOR_FIT_CACHE_DIR", str(tmp_path / "here"))
    get_settings.cache_clear()
    coefficients.clear_memo()
    here = fast_estimate(EstimateRequest.model_validate(
        {"model": str(tiny_dirs["llama"]), "hardware": hardware, "method": r["method"], "config": r["config"]}))
    assert in_process and here["peak_bytes"] == r["estimate"]["peak_bytes"]
    assert {f.name for f in (tmp_path / "here").glob("*.json")} <= {f.name for f in forked}
