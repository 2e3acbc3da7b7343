"""Every benchmark's smoke run (`--quick`) measures and writes what its full run does. That README.md and the
manual show the tables the benchmarks' JSON renders is `tests/test_docs.py`'s check."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


def load_benchmark(name: str):
    """A script of benchmarks/ loaded by its path, as docs_tables.py loads them."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_training_benchmark_smoke_run_writes_its_results(tmp_path):
    training = load_benchmark("training")
    results = training.main(["--quick", "--output_dir", str(tmp_path)])
    assert [(entry["resolution"], entry["batch"]) for entry in results["steps"]] == [(32, 4), (64, 2)]
    for entry in results["steps"]:
        assert set(entry["step_s"]) == set(entry["peak_activation_bytes"]) == set(training.VARIANTS)
        memory = entry["peak_activation_bytes"]
        # The training form holds the linear form's activations and more; ViT's are of the same order.
        assert 0 < memory["castling_linear"] <= memory["castling_training"] < 10 * memory["vit_sdpa"]
    assert results["largest"]["resolution"] == 96 and results["largest"]["peak_activation_bytes"] > 0
    assert "| nano | 64 | 257 | 2 |" in training.markdown_table(results)
    assert (tmp_path / "training.png").stat().st_size > 0


def test_detection_benchmark_smoke_run_writes_its_results(tmp_path):
    detection = load_benchmark("detection")
    results = detection.main(["--quick", "--output_dir", str(tmp_path), "--run_dir", str(tmp_path / "run")])
    training = results["training"]
    assert training["castling"]["eval_castling_map"] == training["linear"]["eval_linear_map"]
    assert [entry["resolution"] for entry in results["latency"]] == [64, 128]
    assert (tmp_path / "detection.png").stat().st_size > 0
    assert training["held_out_images"] == 8  # a fifth of the 40 generated images


def test_segmentation_benchmark_smoke_run_writes_its_results(tmp_path):
    segmentation = load_benchmark("segmentation")
    results = segmentation.main(["--quick", "--output_dir", str(tmp_path), "--run_dir", str(tmp_path / "run")])
    training = results["training"]
    assert training["castling"]["eval_castling_mean_iou"] == training["linear"]["eval_linear_mean_iou"]
    assert training["held_out_images"] == 8  # a fifth of the 40 generated images
    latency = results["latency"]
    assert [entry["resolution"] for entry in latency] == [64, 128]
    for entry in latency:  # both backbones hold activations, and the head adds to them
        for name in ("castling_linear", "dinov2_sdpa"):
            assert 0 < entry["backbone_peak_bytes"][name] < entry["upernet_peak_bytes"][name]
    assert "| nano | 128 | 1024 | upernet |" in segmentation.markdown_table(results)  # 4×4 patches
    assert (tmp_path / "segmentation.png").stat().st_size > 0


def test_castle_benchmark_smoke_run_writes_its_results(tmp_path):
    castle = load_benchmark("castle")
    results = castle.main(["--quick", "--output_dir", str(tmp_path), "--run_dir", str(tmp_path / "run")])
    assert results["start_max_abs_logit_difference"] <= 1e-5  # the castled model starts as the source
    # The inference checkpoint computes what the castled model computed once α reached 0.
    assert results["castled_mean_iou_before_switch"] == results["castled_mean_iou_after_switch"]
    assert set(results["latency_ms"]) == {64, 128} and results["pipeline_labels"]
    assert "| 128 | backbone |" in castle.markdown_table(results)
    assert (tmp_path / "castle.png").stat().st_size > 0


def test_speed_benchmark_smoke_run_times_every_variant(tmp_path):
    # Its floor replaces the attention's forward: a change to that signature must fail here, not in `make bench`.
    results = load_benchmark("speed").main(["--quick", "--output_dir", str(tmp_path)])
    assert results["inference"] and all(
        set(entry["latency_s"]) == {"castling_linear", "vit_sdpa", "floor"} for entry in results["inference"]
    )


def test_towers_benchmark_smoke_run_times_every_variant_through_the_attention_interface(tmp_path):
    results = load_benchmark("towers").main(["--quick", "--output_dir", str(tmp_path)])
    assert {entry["tower"] for entry in results["inference"]} == {"siglip_so400m", "eomt_large"}
    assert all(set(entry["latency_s"]) == {"castled", "sdpa", "floor"} for entry in results["inference"])
    assert (tmp_path / "towers.json").exists() and (tmp_path / "towers_latency.png").exists()


def test_towers_distillation_benchmark_smoke_run_scores_each_family_after_the_switch(tmp_path):
    # A subprocess, as a user runs it: its jobs run in spawned processes that import the script by its path.
    command = [sys.executable, str(ROOT / "benchmarks" / "distillation_towers.py"), "--quick"]
    command += ["--output_dir", str(tmp_path), "--run_dir", str(tmp_path / "run")]
    subprocess.run(command, check=True, capture_output=True, timeout=600)
    results = json.loads((tmp_path / "distillation_towers.json").read_text())
    assert [(entry["family"], entry["route"]) for entry in results["summary"]] == [
        (family, route) for family in ("siglip", "clip", "eomt") for route in ("switch_only", "no_labels")
    ]
    for run in results["runs"]:  # against its own source; the classifiers at their resolution and twice it
        source = next(entry for entry in results["sources"] if entry["family"] == run["family"])
        metric = "mean_iou" if run["family"] == "eomt" else "accuracy"
        sizes = [64] if run["family"] == "eomt" else [64, 128]
        assert [entry["resolution"][0] for entry in run["fidelity"].values()] == sizes
        assert run["fidelity"]["1x"][f"source_{metric}"] == pytest.approx(source[metric], abs=1e-6)
    table = load_benchmark("distillation_towers").markdown_table(results)
    assert "| clip | no_labels | accuracy" in table and "| eomt | no_labels | mean iou" in table

    # A family run again keeps the others' results.
    subprocess.run([*command, "--families", "eomt"], check=True, capture_output=True, timeout=600)
    again = json.loads((tmp_path / "distillation_towers.json").read_text())
    assert [source["family"] for source in again["sources"]] == ["siglip", "clip", "eomt"]
    kept = [sorted((r for r in runs if r["family"] != "eomt"), key=str) for runs in (again["runs"], results["runs"])]
    assert kept[0] == kept[1]


def test_accuracy_benchmark_smoke_run_trains_every_variant(tmp_path):
    # softmax_conv replaces the attention's forward, as the speed benchmark's floor does. A subprocess, as a user
    # runs it: its workers are spawned processes that import the script by its path.
    command = [sys.executable, str(ROOT / "benchmarks" / "accuracy.py"), "--quick", "--output_dir", str(tmp_path)]
    subprocess.run(command, check=True, capture_output=True, timeout=600)
    study = json.loads((tmp_path / "accuracy.json").read_text())
    assert {row["variant"] for row in study["summary"]} >= {"vit", "castling", "softmax_conv"}


def test_distillation_benchmark_smoke_run_scores_every_route_over_seeds(tmp_path):
    # A subprocess, as a user runs it: its jobs run in spawned processes that import the script by its path.
    command = [sys.executable, str(ROOT / "benchmarks" / "distillation.py"), "--quick", "--output_dir", str(tmp_path)]
    command += ["--run_dir", str(tmp_path / "run")]
    subprocess.run(command, check=True, capture_output=True, timeout=600)
    results = json.loads((tmp_path / "distillation.json").read_text())
    distillation = load_benchmark("distillation")
    expected = [("focus", route) for route in distillation.FOCUS_ROUTES]
    expected += [("segmentation", route) for route in distillation.SEGMENTATION_ROUTES]
    assert [(entry["task"], entry["route"]) for entry in results["summary"]] == expected
    for entry in results["summary"]:  # two seeds in a smoke run, switching alone once
        assert entry["seeds"] == ([0] if entry["route"] == "switch_only" else [0, 1])
        assert len(entry["values"]) == len(entry["seeds"]) and entry["std"] >= 0
    for run in results["runs"]:
        assert [entry["resolution"][0] for entry in run["fidelity"].values()] == [64, 128]
        name, castled, source = distillation.metric_of(run)
        expected_source = results["sources"][run["task"]]["accuracy" if name == "accuracy" else "mean_iou"]
        assert 0 <= castled <= 1 and source == pytest.approx(expected_source, abs=1e-6)
    assert results["sources"]["focus"]["curve"]  # the source's held-out accuracy along its training
    assert "| focus | no_labels | no | source's |" in distillation.markdown_table(results)
    assert "few_different − few_different_fresh" in distillation.targets_table(results)
    assert (tmp_path / "distillation.png").stat().st_size > 0

    # After a change to one route: it alone runs again, from the trained source, and the JSON says so.
    subprocess.run([*command, "--rerun", "few_different"], check=True, capture_output=True, timeout=600)
    again = json.loads((tmp_path / "distillation.json").read_text())
    assert [rerun["routes"] for rerun in again["reruns"]] == [["few_different"]]
    assert again["sources"] == results["sources"] and again["command"] == results["command"]
    changed = [old != new for old, new in zip(results["runs"], again["runs"], strict=True)]
    assert changed == [(run["task"], run["route"]) == ("focus", "few_different") for run in results["runs"]]


def test_mvitv2_benchmark_smoke_run_measures_every_model(tmp_path):
    mvitv2 = load_benchmark("mvitv2")
    results = mvitv2.main(["--quick", "--output_dir", str(tmp_path)])
    assert [entry["resolution"] for entry in results["inference"]] == [64, 128]
    for entry in results["inference"]:
        assert set(entry["latency_s"]) == set(entry["macs"]) == set(mvitv2.INFERENCE)
    (training,) = results["training"]
    assert set(training["step_s"]) == set(training["peak_activation_bytes"]) == set(mvitv2.TRAINING)
    assert all(value > 0 for value in training["peak_activation_bytes"].values())
    assert "| 128 |" in mvitv2.markdown_table(results)
    assert (tmp_path / "mvitv2.png").stat().st_size > 0
