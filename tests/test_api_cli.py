"""The service as users run it: a real uvicorn server on 127.0.0.1, and the `advisor` command."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import pytest
from conftest import AdvisorServer

ADVISOR = [sys.executable, "-m", "advisor.cli"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = AdvisorServer(tmp_path_factory.mktemp("srv") / "var").start(timeout=60)
    yield srv.url
    srv.stop()


def test_health_docs_and_catalogs(server):
    assert httpx.get(f"{server}/healthz").json()["status"] == "ok"
    assert httpx.get(f"{server}/docs").status_code == 200
    spec = httpx.get(f"{server}/openapi.json").json()
    assert "/v1/estimate" in spec["paths"] and "/v1/methods" in spec["paths"]
    gpus = httpx.get(f"{server}/v1/hardware", timeout=30).json()
    assert len(gpus) >= 20 and {"id", "usable_memory_gib", "bf16_tflops", "usd_per_hour", "tier"} <= set(gpus[0])
    models = httpx.get(f"{server}/v1/models", timeout=120).json()  # cold: 42 architectures built on meta
    llama7 = next(m for m in models if m["id"] == "meta-llama/Llama-2-7b-hf")
    assert llama7["params"] == 6_738_415_616
    methods = httpx.get(f"{server}/v1/methods", timeout=30).json()
    assert [m["id"] for m in methods][:3] == ["full", "lora", "qlora"] and len(methods) == 15
    assert [m["id"] for m in methods[12:]] == ["peft", "freeze", "llama_pro"] and not any(m["recommended_by_rules"] for m in methods[12:])
    assert all(m["recommended_by_rules"] for m in methods[:12])


def test_config_knobs_over_http_and_cli(server):
    from advisor.config import QuantizationConfig, TrainingConfig

    ref = httpx.get(f"{server}/v1/config", timeout=30).json()
    assert [r["name"] for r in ref["training"]] == list(TrainingConfig.model_fields)
    assert [r["name"] for r in ref["quantization"]] == list(QuantizationConfig.model_fields)
    assert all(r["description"] for rows in ref.values() for r in rows)
    knob = {r["name"]: r for r in ref["training"]}
    assert knob["per_device_train_batch_size"]["limits"] == {"ge": 1, "le": 65536}
    assert "lorafa" in knob["optim"]["allowed"] and knob["cross_entropy"]["allowed"][0] == "standard"
    version = {r["name"]: r for r in ref["quantization"]}["bitsandbytes_version"]
    assert version["type"] == "string or null" and "0.43.2" in version["description"]
    assert json.loads(_cli("knobs", "quantization", "--json").stdout) == {"quantization": ref["quantization"]}
    table = _cli("knobs")
    assert table.returncode == 0 and "gradient_checkpointing_reentrant" in table.stdout
    bad = _cli("knobs", "peft")
    assert bad.returncode == 2 and "section" in bad.stderr and "training" in bad.stderr
    # any knob reaches an estimate from the command line, and a wrong one is named
    args = ("estimate", "--model", "llama-2-7b", "--method", "qlora", "--gpu", "4090", "--batch", "2", "--seq", "512",
            "--json")
    now, old = (json.loads(_cli(*args, *extra).stdout) for extra in
                ((), ("--quantization", "bitsandbytes_version=0.41.1", "--training", "seed=7")))
    assert old["config"]["quantization"]["bitsandbytes_version"] == "0.41.1" and old["config"]["training"]["seed"] == 7
    assert old["peak_vram_gib"] > now["peak_vram_gib"] and any("0.43.2" in n for n in old["notes"])
    bad = _cli(*args, "--quantization", "bitsandbytes_version=new")
    assert bad.returncode == 2 and "config.quantization.bitsandbytes_version" in bad.stderr


def test_exact_estimate_over_http(server, tiny_dirs):
    body = {"model": str(tiny_dirs["llama"]), "hardware": {"gpu": "a100 80gb"}, "method": "lora",
            "config": {"training": {"per_device_train_batch_size": 2, "max_seq_length": 64}}, "exact": True}
    r = httpx.post(f"{server}/v1/estimate", json=body, timeout=120)
    assert r.status_code == 200, r.text
    est = r.json()
    assert est["fits"] is True and est["peak_bytes"] > 0
    assert set(est["breakdown_gib"]) == {"weights", "trainable", "gradients", "optimizer", "activations", "logits", "overhead"}
    assert abs(sum(est["breakdown_gib"].values()) - est["peak_vram_gib"]) < 0.01
    assert "simulated" in est["provenance"]["memory"]


@pytest.mark.parametrize(
    "body,field",
    [
        ({"model": "llama-2-7b", "hardware": {"gpu": "RTX 9999"}, "method": "lora", "exact": True}, "hardware.gpu"),
        ({"model": "no-such/model-xyz", "hardware": {"gpu": "4090"}, "method": "lora", "exact": True}, "model"),
        ({"model": "llama-2-7b", "hardware": {"gpu": "4090"}, "method": "superlora", "exact": True}, "method"),
        ({"model": "llama-2-7b", "hardware": {"gpu": "4090", "count": 0}, "method": "lora"}, "hardware.count"),
        ({"model": "llama-2-7b", "hardware": {"gpu": "4090", "count": 2000}, "method": "lora"}, "hardware.count"),
        ({"model": "llama-2-7b", "hardware": {"gpu": "4090"}, "method": "lora", "exact": True,
          "config": {"training": {"per_device_train_batch_size": 0}}}, "config.training.per_device_train_batch_size"),
        ({"model": "llama-2-7b", "hardware": {"gpu": "4090"}, "method": "lora", "exact": True,
          "config": {"training": {"max_seq_length": 100000}}}, "config.training.max_seq_length"),
        ({"model": "google/flan-t5-base", "hardware": {"gpu": "4090"}, "method": "longlora", "exact": True}, "method"),
        ({"model": "gpt2", "hardware": {"gpu": "4090"}, "method": "lora", "exact": True, "colour": "red"}, "colour"),
        ({"model": "gpt2", "hardware": {"gpu": "4090"}, "method": "lora", "exact": True,
          "dataset": {"num_examples": 10, "avg_tokens": 900, "max_tokens": 100}}, "dataset"),
        # sizes out of range were a 500 from deep in the simulation (a vocabulary of 0; PEFT allocating 64 GB)
        ({"model": {"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                    "vocab_size": 0}, "hardware": {"gpu": "4090"}, "method": "lora"}, "model.vocab_size"),
        ({"model": {"model_type": "llama", "hidden_size": 10**9, "num_hidden_layers": 2, "num_attention_heads": 4},
          "hardware": {"gpu": "4090"}, "method": "lora"}, "model.hidden_size"),
        # a name neither in the model nor Llama-style was replaced by the architecture's default, silently
        ({"model": "gpt2", "hardware": {"gpu": "4090"}, "method": "lora",
          "config": {"peft": {"target_modules": ["nope"]}}}, "config.peft.target_modules"),
    ],
)
def test_bad_input_is_422_naming_the_field(server, body, field):
    r = httpx.post(f"{server}/v1/estimate", json=body, timeout=60)
    assert r.status_code == 422, r.text
    assert r.json()["field"] == field, r.json()
    assert httpx.get(f"{server}/healthz").status_code == 200  # the service is unaffected


def test_a_fault_of_the_service_is_json_and_the_next_request_is_served(monkeypatch):
    """A bug (here an estimator made to fail) answers 500 with JSON a client can show, not a bare text page; text
    that is not JSON is a 422 naming the body, not a field called "1"."""
    from fastapi.testclient import TestClient

    import advisor.api.routes.estimate as route
    from advisor.api.app import create_app

    def broken(*_args, **_kwargs):
        raise RuntimeError("estimator fault")

    monkeypatch.setattr(route, "run_estimate", broken)
    client = TestClient(create_app(), raise_server_exceptions=False)
    body = {"model": "gpt2", "hardware": {"gpu": "4090"}, "method": "lora"}
    r = client.post("/v1/estimate", json=body)
    assert r.status_code == 500 and r.json()["field"] is None
    assert "RuntimeError: estimator fault" in r.json()["detail"]
    assert client.get("/healthz").json()["status"] == "ok"
    r = client.post("/v1/estimate", content=b'{"model": "gpt2",', headers={"content-type": "application/json"})
    assert r.status_code == 422 and r.json()["field"] == "body" and "not valid JSON" in r.json()["detail"]


def test_model_directory_without_config_is_422(server, tmp_path):
    empty = tmp_path / "empty-model"
    empty.mkdir()
    r = httpx.post(f"{server}/v1/estimate", json={"model": str(empty), "hardware": {"gpu": "4090"}, "method": "lora",
                                                 "exact": True})
    assert r.status_code == 422 and r.json()["field"] == "model" and "config.json" in r.json()["detail"]


def _cli(*args, env_extra=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200", **(env_extra or {})}
    return subprocess.run([*ADVISOR, *args], capture_output=True, text=True, timeout=300, env=env)


def test_cli_lists_catalogs_as_json():
    gpus = json.loads(_cli("hardware", "--json").stdout)
    models = json.loads(_cli("models", "--json").stdout)
    methods = json.loads(_cli("methods", "--json").stdout)
    assert len(gpus) >= 20 and len(models) >= 25 and len(methods) == 15
    assert [m["id"] for m in methods][-3:] == ["peft", "freeze", "llama_pro"]
    table = _cli("models")
    assert table.returncode == 0 and "Llama-2-70b-hf" in table.stdout


def test_cli_demo_assets_and_exact_estimate(tmp_path):
    out = _cli("demo-assets", str(tmp_path / "demo"))
    assert out.returncode == 0, out.stderr
    for name in ("alpaca", "chat", "completion", "text"):
        rows = (tmp_path / "demo" / "data" / f"{name}.jsonl").read_text().splitlines()
        assert len(rows) >= 32 and json.loads(rows[0])
    assert (tmp_path / "demo" / "tiny-llama" / "config.json").exists()
    req = tmp_path / "req.json"
    req.write_text(json.dumps({"model": str(tmp_path / "demo" / "tiny-llama"), "hardware": {"gpu": "T4"},
                               "method": "qlora", "config": {"training": {"max_seq_length": 64}}}))
    res = _cli("estimate", "--file", str(req), "--exact", "--json")
    assert res.returncode == 0, res.stderr
    est = json.loads(res.stdout)
    assert est["method"] == "qlora" and est["fits"] and est["breakdown_gib"]["weights"] > 0
    pretty = _cli("estimate", "--file", str(req), "--exact")
    assert pretty.returncode == 0 and "peak" in pretty.stdout and "weights" in pretty.stdout
    alloc = est["allocator"]  # a GPU estimate replays the allocator (the H100 profile measured its inputs)
    assert est["peak_bytes"] == alloc["reserved_peak_bytes"] + alloc["context_bytes"]
    assert "allocator (replayed): reserved" in pretty.stdout


def test_cli_bad_input_exits_2_naming_the_field(tmp_path):
    res = _cli("estimate", "--model", "llama-2-7b", "--method", "lora", "--gpu", "RTX 9999", "--exact")
    assert res.returncode == 2 and "hardware.gpu" in res.stderr
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    res = _cli("estimate", "--file", str(bad))
    assert res.returncode == 2 and "--file" in res.stderr
    res = _cli("estimate", "--model", "llama-2-7b", "--method", "lora", "--gpu", "4090", "--batch", "0", "--exact")
    assert res.returncode == 2 and "per_device_train_batch_size" in res.stderr


def test_fast_estimate_over_http_has_band_time_cost_and_provenance(server, tiny_dirs):
    body = {"model": str(tiny_dirs["llama"]), "hardware": {"gpu": "RTX 4090"}, "method": "qlora",
            "config": {"training": {"per_device_train_batch_size": 2, "max_seq_length": 64,
                                    "gradient_checkpointing": True}},
            "dataset": {"num_examples": 1000, "avg_tokens": 48, "max_tokens": 64}}
    r = httpx.post(f"{server}/v1/estimate", json=body, timeout=120)
    assert r.status_code == 200, r.text
    est = r.json()
    assert est["peak_vram_low_gib"] <= est["peak_vram_gib"] <= est["peak_vram_high_gib"]
    assert est["fits"] and est["max_micro_batch"] >= 2
    assert est["tokens_per_s"] > 0 and est["train_hours"] > 0 and est["cost_usd"] >= 0
    assert est["provenance"]["memory"].startswith("fitted:") and est["provenance"]["profile"]
    assert est["breakdown_gib"]["overhead"] > 0  # CUDA context/allocator terms for a GPU target
    exact = httpx.post(f"{server}/v1/estimate", json={**body, "exact": True}, timeout=120).json()

    def tensors(e):  # the exact estimate's device terms come from its allocator replay, the fast one's are fitted
        return e["peak_bytes"] - e["breakdown_gib"]["overhead"] * 2**30

    assert abs(tensors(est) - tensors(exact)) / tensors(exact) < 0.05
    assert "allocator replay" in exact["provenance"]["overhead"]


def test_compare_gpus_over_http_ranks_by_cost(server, tiny_dirs):
    body = {"model": "meta-llama/Llama-2-7b-hf", "method": "lora",
            "config": {"training": {"per_device_train_batch_size": 1, "max_seq_length": 512}},
            "dataset": {"num_examples": 2000, "avg_tokens": 400, "max_tokens": 512}}
    rows = httpx.post(f"{server}/v1/estimate/compare-gpus", json=body, timeout=300).json()
    assert len(rows) >= 80
    fitting = [r for r in rows if r["fits"]]
    assert fitting and not rows[-1]["fits"] or all(r["fits"] for r in rows)
    costs = [r["cost_usd"] for r in fitting if r["cost_usd"] is not None]
    assert costs == sorted(costs)
    small = next(r for r in rows if r["gpu"] == "rtx-3060" and r["count"] == 1)
    assert small["fits"] is False  # 13 GiB of bf16 weights alone exceed a 12 GB card


def test_unknown_strategy_is_422(server):
    r = httpx.post(f"{server}/v1/estimate", json={"model": "gpt2", "hardware": {"gpu": "a100", "count": 2},
                                                 "method": "lora", "strategy": "zero9"}, timeout=60)
    assert r.status_code == 422 and r.json()["field"] == "strategy"


def test_the_strategy_an_estimate_reports_is_accepted_back(server):
    """A one-GPU estimate reports strategy "single"; sending it back gives the same estimate, and on several GPUs
    it is refused with the field named (it was an unknown-strategy error either way)."""
    body = {"model": "gpt2", "hardware": {"gpu": "a100", "count": 1}, "method": "lora"}
    first = httpx.post(f"{server}/v1/estimate", json=body, timeout=60).json()
    assert first["strategy"] == "single"
    again = httpx.post(f"{server}/v1/estimate", json={**body, "strategy": "single"}, timeout=60)
    assert again.status_code == 200 and again.json()["peak_bytes"] == first["peak_bytes"]
    r = httpx.post(f"{server}/v1/estimate", json={**body, "hardware": {"gpu": "a100", "count": 4},
                                                 "strategy": "single"}, timeout=60)
    assert r.status_code == 422 and r.json()["field"] == "strategy" and "hardware.count is 4" in r.json()["detail"]


def test_cli_estimate_flags_for_the_loss_and_the_optimizer(tmp_path):
    """--cross-entropy, --optim, --activation-offloading, --torch-compile and --optimizer-in-backward reach
    config.training (the last one with what it needs: accumulation 1, no clipping); a file that asks for accumulation
    anyway is refused naming that field."""
    base = ("estimate", "--model", "Qwen/Qwen2.5-0.5B", "--method", "full", "--gpu", "4090", "--seq", "256")
    res = _cli(*base, "--cross-entropy", "fused_linear", "--optim", "paged_adamw_8bit", "--optimizer-in-backward",
               "--activation-offloading", "--torch-compile", "--json")
    assert res.returncode == 0, res.stderr
    training = json.loads(res.stdout)["config"]["training"]
    assert training["cross_entropy"] == "fused_linear" and training["optim"] == "paged_adamw_8bit"
    assert training["optimizer_in_backward"] is True and training["activation_offloading"] is True
    assert training["torch_compile"] is True
    assert training["gradient_accumulation_steps"] == 1 and training["max_grad_norm"] == 0
    req = tmp_path / "req.json"
    req.write_text(json.dumps({"config": {"training": {"gradient_accumulation_steps": 8}}}))
    refused = _cli(*base, "--file", str(req), "--optimizer-in-backward")
    assert refused.returncode == 2 and "config.training.gradient_accumulation_steps" in refused.stderr


def test_cli_estimate_takes_method_knobs_and_an_8bit_base():
    """--peft KEY=VALUE reaches config.peft (JSON values: numbers, booleans, lists), --load-in-8bit the 8-bit base; an
    unknown knob or a malformed pair exits 2 naming it."""
    base = ("estimate", "--model", "Qwen/Qwen2.5-0.5B", "--gpu", "4090", "--seq", "128", "--batch", "1")
    res = _cli(*base, "--method", "qlora", "--peft", "r=32", "--peft", "use_dora=true",
               "--peft", 'modules_to_save=["lm_head"]', "--load-in-8bit", "--json")
    assert res.returncode == 0, res.stderr
    config = json.loads(res.stdout)["config"]
    assert config["peft"]["r"] == 32 and config["peft"]["use_dora"] is True
    assert config["peft"]["modules_to_save"] == ["lm_head"] and config["quantization"]["load_in_8bit"] is True
    unknown = _cli(*base, "--method", "lora", "--peft", "rank=8")
    assert unknown.returncode == 2 and "config.peft.rank" in unknown.stderr
    malformed = _cli(*base, "--method", "lora", "--peft", "r")
    assert malformed.returncode == 2 and "--peft" in malformed.stderr


def test_any_peft_type_and_a_gptq_base_over_http(server, tiny_dirs):
    """Method "peft" takes an adapter_config.json as config.peft; qlora takes a GPTQ checkpoint's settings; bad ones
    are 422 naming the field."""
    base = {"model": str(tiny_dirs["llama"]), "hardware": {"gpu": "RTX 4090"},
            "config": {"training": {"per_device_train_batch_size": 2, "max_seq_length": 64}}}
    loha = {**base, "method": "peft", "config": {**base["config"], "peft": {
        "peft_type": "LOHA", "r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"], "base_model_name_or_path": None}}}
    r = httpx.post(f"{server}/v1/estimate", json=loha, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["method"] == "peft" and "LOHA has no probe of its own" in r.json()["provenance"]["time"]
    bad = {**loha, "config": {**loha["config"], "peft": {"peft_type": "LOHA", "rank": 4}}}
    r = httpx.post(f"{server}/v1/estimate", json=bad, timeout=60)
    assert r.status_code == 422 and r.json()["field"] == "config.peft.rank" and "r" in r.json()["allowed"]
    gptq = {**base, "method": "qlora", "config": {**base["config"], "quantization": {"quant_method": "gptq"}}}
    r = httpx.post(f"{server}/v1/estimate", json=gptq, timeout=120)
    assert r.status_code == 200, r.text
    assert r.json()["config"]["quantization"]["quant_method"] == "gptq"


def test_cli_says_which_memory_model_it_is_fitting(tmp_path, monkeypatch):
    """A cold recommendation fits each candidate for seconds: on a terminal the status line names the method being
    fitted and counts those done; off a terminal (a pipe, --json into a file) it prints nothing."""
    import io

    from rich.console import Console

    from advisor.cli_guard import fit_status
    from advisor.estimator import coefficients
    from advisor.estimator.service import run_estimate
    from advisor.schemas import EstimateRequest
    from advisor.settings import get_settings

    monkeypatch.setenv("ADVISOR_FIT_CACHE_DIR", str(tmp_path / "fits"))  # cold: the fit runs here
    get_settings.cache_clear()
    coefficients.clear_memo()
    tiny = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
            "num_attention_heads": 4, "vocab_size": 256, "max_position_embeddings": 512}

    def request(seq: int):
        return EstimateRequest.model_validate({"model": tiny, "hardware": {"gpu": "4090"}, "method": "lora", "config": {
            "training": {"gradient_checkpointing": False, "max_seq_length": seq}}})

    heard = []
    with coefficients.fit_listener(lambda event, info: heard.append((event, info["method"], info["seq_len"]))):
        run_estimate(request(72))
        run_estimate(request(72))  # fitted already: nothing to hear
    assert heard == [("start", "lora", 72), ("end", "lora", 72)]

    terminal = io.StringIO()
    with fit_status(Console(file=terminal, force_terminal=True, width=200), "estimating..."):
        run_estimate(request(80))
    assert "fitting the memory model of lora at 80 tokens" in terminal.getvalue()
    piped = io.StringIO()
    with fit_status(Console(file=piped, width=200), "estimating..."):
        run_estimate(request(72))
    assert piped.getvalue() == ""
    get_settings.cache_clear()
