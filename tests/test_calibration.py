"""`advisor calibrate`: a quick CPU calibration writes a valid profile whose held-out errors and rates make sense;
corrupt profiles never break estimates; the background API route runs one calibration at a time."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from advisor.errors import AdvisorInputError

METHODS = ["full", "lora", "galore"]
REPO_PROFILES = Path(__file__).resolve().parents[1] / "profiles"


@pytest.fixture(scope="module")
def shared_data_root(tmp_path_factory):
    """One data root (coefficient cache) for the module: the API test reuses the quick run's fits."""
    return tmp_path_factory.mktemp("calibration-var")


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory, shared_data_root):
    from advisor.calibration.run import calibrate
    from advisor.settings import get_settings

    out = tmp_path_factory.mktemp("calibration-out") / "cpu-test.json"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ADVISOR_DATA_ROOT", str(shared_data_root))
        get_settings.cache_clear()
        seen = []
        result = calibrate(methods=METHODS, quick=True, out=out, device="cpu", threads=1,
                           progress=lambda done, total, label: seen.append((done, total)))
    get_settings.cache_clear()
    result["progress_seen"] = seen
    return result


def test_quick_calibration_writes_a_valid_cpu_profile(quick_run):
    from advisor.estimator.profile import read_profile

    path = Path(quick_run["profile_path"])
    profile = read_profile(path)
    assert profile.device_kind == "cpu" and profile.id.startswith("cpu-")
    data = json.loads(path.read_text())
    assert {"format", "id", "device", "date", "versions", "status", "overhead", "band", "throughput"} <= set(data)
    assert {"torch", "transformers", "peft", "bitsandbytes"} <= set(data["versions"])
    assert "cuda-default.json" in data["status"]  # a CPU profile says the CUDA terms were not measured
    # the counter is exact on CPU: no overhead to add
    assert data["overhead"]["context_bytes"] == 0 and data["overhead"]["allocator_fraction"] < 0.01
    low, high = profile.band()
    assert low <= 0 <= high
    cal = data["calibration"]
    assert cal["grid"] == "quick" and cal["failures"] == []
    assert len(cal["probe_table"]) == 3 * len(METHODS) and len(cal["heldout_table"]) == len(METHODS)
    assert quick_run["progress_seen"][-1] == (3 * len(METHODS), 3 * len(METHODS))


@pytest.mark.parametrize("method", METHODS)
def test_achieved_flops_are_positive_for_each_method(quick_run, method):
    from advisor.estimator.profile import read_profile

    profile = read_profile(Path(quick_run["profile_path"]))
    rate, source = profile.achieved_flops(method, None)
    assert rate is not None and rate > 0, source
    fit = profile.data["throughput"]["fit"][method]
    assert fit["n"] == 2 and fit["how"]


@pytest.mark.parametrize("method", ["full", "galore", "lora"])
def test_heldout_memory_error_on_cpu_within_1_percent(quick_run, method):
    rows = [r for r in quick_run["heldout"] if r["method"] == method]
    assert rows, f"no held-out probe of {method}"
    for r in rows:
        assert abs(r["memory_error"]) <= 0.01, r


def test_calibrated_profile_gives_cpu_time_estimates(quick_run, tiny_dirs, monkeypatch):
    from advisor.estimator import profile as prof
    from advisor.estimator.fast import fast_estimate
    from advisor.schemas import EstimateRequest

    monkeypatch.setenv("ADVISOR_PROFILE", quick_run["profile_path"])
    prof.clear_cache()
    try:
        req = EstimateRequest(model=str(tiny_dirs["llama"]), hardware={"gpu": "none"}, method="lora",
                              config={"training": {"per_device_train_batch_size": 2, "max_seq_length": 64}},
                              dataset={"num_examples": 100, "avg_tokens": 64})
        est = fast_estimate(req)
    finally:
        monkeypatch.delenv("ADVISOR_PROFILE")
        prof.clear_cache()
    assert est["provenance"]["profile"] == quick_run["profile"]["id"]
    assert est["tokens_per_s"] > 0 and est["train_hours"] > 0
    assert not [n for n in est["notes"] if "calibration profile" in n]


@pytest.mark.parametrize("content", ["{ not json", json.dumps({"format": 99, "id": "x", "device": {"kind": "cpu"}}),
                                     json.dumps(["a", "list"])])
def test_corrupt_profile_does_not_break_fast_estimate(tmp_path, tiny_dirs, monkeypatch, content):
    from advisor.estimator import profile as prof
    from advisor.estimator.fast import fast_estimate
    from advisor.schemas import EstimateRequest

    bad = tmp_path / "cpu-broken.json"
    bad.write_text(content)
    monkeypatch.setenv("ADVISOR_PROFILE", str(bad))
    prof.clear_cache()
    try:
        req = EstimateRequest(model=str(tiny_dirs["llama"]), hardware={"gpu": "none"}, method="lora",
                              config={"training": {"per_device_train_batch_size": 1, "max_seq_length": 64}})
        est = fast_estimate(req)
    finally:
        monkeypatch.delenv("ADVISOR_PROFILE")
        prof.clear_cache()
    assert est["peak_bytes"] > 0
    assert est["provenance"]["profile"] != "cpu-broken"
    assert any(str(bad) in n and "shipped profile" in n for n in est["notes"]), est["notes"]


def test_unknown_method_is_an_input_error_and_exit_code_2():
    import typer
    from typer.testing import CliRunner

    from advisor.calibration.cli import calibrate_command
    from advisor.calibration.run import parse_methods
    from advisor.methods import METHOD_IDS

    with pytest.raises(AdvisorInputError) as err:
        parse_methods("lora,dora")
    assert err.value.field == "methods" and err.value.allowed == list(METHOD_IDS) and "dora" in err.value.message
    assert parse_methods(" LoRA, full ") == ["full", "lora"]  # registry order, case-insensitive
    app = typer.Typer()
    app.command("calibrate")(calibrate_command)
    app.command("other")(lambda: None)
    result = CliRunner().invoke(app, ["calibrate", "--methods", "dora"])
    assert result.exit_code == 2
    assert "methods" in result.output and "dora" in result.output


def test_interrupted_calibration_resumes_from_its_rows(tmp_path, monkeypatch, shared_data_root):
    """Each finished probe is appended to <out>.rows.jsonl; --resume keeps those rows and runs only the rest; rows of
    another grid are refused by name; a fresh start keeps the old rows beside it."""
    from advisor.calibration.run import calibrate, partial_path
    from advisor.settings import get_settings

    monkeypatch.setenv("ADVISOR_DATA_ROOT", str(shared_data_root))
    get_settings.cache_clear()
    out = tmp_path / "cpu-resume.json"

    class Stop(Exception):
        pass

    def stop_after_two(done, total, label):
        if done == 2 and label != "fitting":
            raise Stop

    with pytest.raises(Stop):
        calibrate(methods=["lora"], quick=True, out=out, device="cpu", threads=1, progress=stop_after_two)
    lines = partial_path(out).read_text().splitlines()
    assert json.loads(lines[0])["grid"] == "quick" and len(lines) == 3  # header + the two probes that finished
    assert not out.exists()
    kept = [json.loads(line) for line in lines[1:]]

    header = json.loads(lines[0])
    partial_path(out).write_text("\n".join([json.dumps({**header, "grid": "full"}), *lines[1:]]) + "\n")
    with pytest.raises(AdvisorInputError) as err:
        calibrate(methods=["lora"], quick=True, out=out, device="cpu", threads=1, resume=True)
    assert err.value.field == "resume" and "grid" in str(err.value)
    partial_path(out).write_text("\n".join(lines) + "\n")

    ran = []
    result = calibrate(methods=["lora"], quick=True, out=out, device="cpu", threads=1, resume=True,
                       progress=lambda done, total, label: ran.append(label))
    get_settings.cache_clear()
    assert result["resumed_probes"] == 2
    assert [label for label in ran if label.startswith("lora/")] == ["lora/llama_s/b4/s128/nogc"]
    table = json.loads(out.read_text())["calibration"]["probe_table"]
    assert len(table) == 3 and not partial_path(out).exists()
    by_key = {(r["batch"], r["gc"]): r for r in table}
    for r in kept:  # the resumed rows are the measurements taken before the interruption, not new ones
        assert by_key[(r["batch"], r["gc"])]["measured_peak_bytes"] == r["measured_peak_bytes"]
        assert by_key[(r["batch"], r["gc"])]["step_seconds"] == pytest.approx(r["step_seconds"], abs=1e-5)

    partial_path(out).write_text("\n".join(lines) + "\n")  # without --resume: a fresh start, old rows set aside
    with pytest.raises(Stop):
        calibrate(methods=["lora"], quick=True, out=out, device="cpu", threads=1, progress=stop_after_two)
    get_settings.cache_clear()
    assert partial_path(out).with_name(partial_path(out).name + ".prev").read_text().splitlines() == lines


H100_PROFILE = REPO_PROFILES / "calibration" / "cuda-h100-80gb-hbm3.json"


@pytest.mark.parametrize("probe", ["lora/llama_l/b2/s512/nogc", "qlora/llama_l/b4/s256/gc",
                                   "galore/llama_l/b1/s512/gc", "full/gpt2_m/b2/s256/nogc"])
def test_cuda_simulation_equals_the_h100_counter(tmp_path, probe):
    """The committed H100 calibration measured every probe with the live-bytes counter on CUDA tensors. Simulated
    with target="cuda" on this CPU-only machine, the same probe gives the same tensor bytes (within 0.05%: GPT-2's
    two RNG scalars per attention call and the log-sum-exp's layout), where the CPU kernels' count is up to 80%
    higher (dropout masks, GPT-2's attention dropout on the math path)."""
    from advisor.calibration.probes import Probe, load_grid, probe_config, write_models
    from advisor.memory.simulate import simulate_in_process

    from advisor.calibration.probes import probe_key

    cal = json.loads(H100_PROFILE.read_text())["calibration"]
    rows = {probe_key(r): r for r in cal["probe_table"]}
    row = rows[probe]
    grid = load_grid()
    assert cal["steps_per_probe"] == grid["steps"] and f"of {grid['steps']} steps" in cal["step_time"]
    p = Probe(row["method"], row["arch"], row["batch"], row["seq"], bool(row["gc"]), 0)
    model_dir = write_models(grid, [p.arch], tmp_path)[p.arch]
    from advisor.catalog.models import resolve_model
    from advisor.methods import get_method

    resolved = resolve_model(str(model_dir))
    cfg = get_method(p.method).resolve_config(probe_config(grid, p))
    # the H100 probes predate SIM_VERSION 9: GaLore's projections were computed once, not refreshed in step 2
    sim = simulate_in_process(resolved, cfg, p.batch, p.seq, target="cuda", refresh_projections=False)["peak_bytes"]
    assert abs(sim - row["measured_peak_bytes"]) <= 5e-4 * row["measured_peak_bytes"], (sim, row["measured_peak_bytes"])


def test_estimates_prefer_the_measured_profile_of_their_gpu(tmp_path):
    """With several measured CUDA profiles, an estimate for a GPU takes that GPU's own, else the newest measured one;
    the shipped default comes last."""
    from advisor.estimator.profile import _measured_order

    def write(name, catalog_id, date):
        path = tmp_path / name
        path.write_text(json.dumps({"format": 1, "id": path.stem, "date": date,
                                    "device": {"kind": "cuda", "catalog_id": catalog_id}}))
        return path

    a100 = write("cuda-a100.json", "a100-sxm-80gb", "2026-01-05")
    h100 = write("cuda-h100.json", "h100-sxm", "2026-11-22")
    default = write("cuda-default.json", None, "2026-12-01")
    assert _measured_order([default, h100, a100], "a100-sxm-80gb") == [a100, h100, default]
    assert _measured_order([default, a100, h100], None) == [h100, a100, default]
    assert _measured_order([a100, default, h100], "rtx-4090") == [h100, a100, default]


def test_grid_plans_every_method_and_holds_out_as_documented():
    from advisor.calibration.probes import load_grid, plan_probes
    from advisor.methods import METHOD_IDS

    grid = load_grid()
    probes, skipped = plan_probes(grid, "full", list(METHOD_IDS))
    assert {p.method for p in probes} == set(METHOD_IDS)
    assert {p.arch for p in probes if p.heldout} == {"llama_m"}
    assert not [p for p in probes if p.method == "prefix_tuning" and p.gc] and skipped
    assert {p.arch for p in probes if p.method == "bitfit"} == {"llama_s", "llama_m", "gpt2_s"}
    quick, _ = plan_probes(grid, "quick", list(METHOD_IDS))
    assert {p.arch for p in quick} == {"llama_s"} and all(p.heldout == (p.index == 2) for p in quick)
    # methods interleaved per grid point, so load drift on a shared machine does not fall on one method
    assert [p.method for p in quick[:len(METHOD_IDS)]] == list(METHOD_IDS)
    assert len({(p.arch, p.index) for p in probes[:len(METHOD_IDS)]}) == 1


def test_fit_recovers_known_overhead_and_rate():
    """Synthetic CUDA-like rows: measured = 1.07·x + 600 MiB, time = flops/2e12 + 5 ms."""
    from advisor.calibration.fit import fit_all

    rows = []
    for i, x in enumerate([1e8, 2e8, 4e8, 8e8, 1.6e9, 3.2e9]):
        flops = 1e11 * (i + 1)
        rows.append({"method": "lora", "arch": "a", "batch": 1, "seq": 1, "gc": False, "heldout": i % 3 == 2,
                     "error": None, "predicted_tensor_bytes": x, "measured_device_bytes": 1.07 * x + 600 * 2**20,
                     "flops_per_step": flops, "step_seconds": flops / 2e12 + 0.005})
    fitted = fit_all(rows)
    assert fitted["memory"]["allocator_fraction"] == pytest.approx(0.07, abs=1e-4)
    assert fitted["memory"]["context_bytes"] == pytest.approx(600 * 2**20, rel=1e-3)
    assert fitted["time"]["lora"]["rate"] == pytest.approx(2e12, rel=1e-6)
    assert fitted["time"]["lora"]["t0"] == pytest.approx(0.005, rel=1e-4)
    assert fitted["summary"]["heldout"]["memory_abs_error_max"] < 1e-6
    # an estimator that over-predicts gets no negative overhead: the band carries it
    for r in rows:
        r["measured_device_bytes"] = 0.97 * r["predicted_tensor_bytes"]
    fitted = fit_all(rows)
    assert fitted["memory"]["allocator_fraction"] == 0 and fitted["memory"]["context_bytes"] == 0
    assert fitted["band"]["low"] == pytest.approx(-0.03, abs=1e-6) and fitted["band"]["high"] == 0


def test_the_launch_floor_is_fitted_from_the_h100_probes_and_predicts_the_held_out_ones():
    """The committed H100 profile's launch floor is what `fit_launch_floor` makes of its stored probe table (the
    training probes only), and on the held-out architecture the estimator's step time, floored, is far closer to the
    measured one than FLOPs ÷ (peak × MFU) alone, which is an order of magnitude too fast on these small steps."""
    from advisor.calibration.fit import fit_launch_floor, launch_floor_evaluation
    from advisor.calibration.probes import load_grid

    profile = json.loads(H100_PROFILE.read_text())
    rows, t = profile["calibration"]["probe_table"], profile["throughput"]
    archs = load_grid()["archs"]
    floor = fit_launch_floor(rows, archs)
    assert floor == t["launch_floor_s_per_block"]
    assert floor["lora"]["gc"] > floor["lora"]["no_gc"] > 0.001  # recomputation launches a block's forward again
    from advisor.catalog.gpus import resolve_gpu

    peak = resolve_gpu(profile["device"]["catalog_id"]).bf16_tflops
    held = launch_floor_evaluation(rows, archs, floor, peak, t["mfu_measured"], t["default_mfu"])
    assert held == t["launch_floor_heldout"] and held["n"] >= 100
    assert held["with_floor"]["median_abs"] < 0.25 < 5 < held["flops_only"]["median_abs"]


def test_a_small_step_is_launch_bound_and_a_large_one_is_not():
    """Llama-2-7B LoRA on an H100: 128 tokens take the launch floor (33 × the per-block time), not the 9 ms their
    FLOPs would; 8 × 1024 tokens stay FLOP-bound, as the real-size H100 runs measured."""
    from advisor.estimator.fast import fast_estimate
    from advisor.estimator.profile import read_profile
    from advisor.schemas import EstimateRequest

    per_block = read_profile(H100_PROFILE).data["throughput"]["launch_floor_s_per_block"]["lora"]

    def tokens_per_s(b, s, gc):
        return fast_estimate(EstimateRequest.model_validate({
            "model": "meta-llama/Llama-2-7b-hf", "hardware": {"gpu": "h100"}, "method": "lora", "config": {
                "training": {"per_device_train_batch_size": b, "max_seq_length": s, "gradient_checkpointing": gc}}}))

    small = tokens_per_s(1, 128, False)
    assert small["tokens_per_s"] == pytest.approx(128 / (per_block["no_gc"] * 33), rel=1e-3)
    assert "launch-bound" in small["provenance"]["time"]
    large = tokens_per_s(8, 1024, False)
    assert "launch-bound" not in large["provenance"]["time"] and large["tokens_per_s"] > 5 * small["tokens_per_s"]


def test_api_runs_one_calibration_at_a_time(tmp_path, monkeypatch, shared_data_root):
    from fastapi.testclient import TestClient

    from advisor.api.app import create_app
    from advisor.api.routes import calibrations
    from advisor.settings import get_settings

    # the server writes to profiles/calibration/ of ADVISOR_PROFILES_DIR: a scratch copy, never the repo's
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    for name in ("gpus.yaml", "models"):
        os.symlink(REPO_PROFILES / name, profiles / name)
    monkeypatch.setenv("ADVISOR_PROFILES_DIR", str(profiles))
    monkeypatch.setenv("ADVISOR_DATA_ROOT", str(shared_data_root))
    get_settings.cache_clear()
    app = create_app()
    if not any(getattr(r, "path", "") == "/v1/calibrations" for r in app.routes):
        app.include_router(calibrations.router)
    client = TestClient(app)

    r = client.post("/v1/calibrations", json={"methods": ["lora", "dora"], "quick": True})
    assert r.status_code == 422 and r.json()["field"] == "methods", r.text
    r = client.post("/v1/calibrations", json={"methods": ["lora"], "quick": True, "unknown": 1})
    assert r.status_code == 422, r.text

    r = client.post("/v1/calibrations", json={"methods": ["lora"], "quick": True, "threads": 1})
    assert r.status_code == 202, r.text
    job = r.json()
    assert job["status"] == "queued" and job["id"]
    busy = client.post("/v1/calibrations", json={"methods": ["full"], "quick": True})
    assert busy.status_code == 409, busy.text

    deadline = time.time() + 300
    while True:
        status = client.get(f"/v1/calibrations/{job['id']}").json()
        if status["status"] in ("succeeded", "failed") or time.time() > deadline:
            break
        assert status["status"] in ("queued", "running")
        time.sleep(0.5)
    assert status["status"] == "succeeded", status.get("error")
    assert status["progress"]["done"] == status["progress"]["total"] == 3
    path = Path(status["profile_path"])
    assert path.parent == profiles / "calibration" and path.exists()
    assert status["heldout_summary"]["n"] == 1 and status["band"]["low"] <= 0
    assert job["id"] in [j["id"] for j in client.get("/v1/calibrations").json()]
    assert client.get("/v1/calibrations/nope").status_code == 404
    get_settings.cache_clear()
