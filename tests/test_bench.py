"""Smoke runs of the benches in bench/: they keep working and print the JSON their readers use.

Numbers are not asserted (they belong to the machine); keys, counts and the agreement with PyTorch are."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KEYS = {"images", "score_ips", "plain_torch_ips", "model_only_ips", "ratio_vs_plain", "peak_rss_mb",
        "peak_rss_mb_10x", "images_10x", "score_ips_10x", "rss_ratio_10x", "prob_max_abs_diff_vs_torch",
        "class_agreement_vs_torch", "backend", "precision", "tta"}


@pytest.fixture(scope="module")
def package(tiny_package):
    return tiny_package


def _bench(*args: str) -> dict:
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "score_throughput.py"), *args], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_score_benchmark_smoke(package, tmp_path):
    work = tmp_path / "work"
    out = _bench("--n", "24", "--factor", "2", "--plain-n", "16", "--batch-size", "8", "--model",
                 str(package / "pkg"), "--workdir", str(work), "--calibrate-data", str(package / "data"))
    assert KEYS <= set(out), KEYS - set(out)
    assert out["images"] == 24 and out["images_10x"] == 48
    assert out["tta"] == "adaptive"  # the first mode, in all three measurements
    modes = out["modes"]
    assert list(modes) == ["adaptive", "none", "dihedral8"]
    assert modes["none"]["rescored_fraction"] == 0 and modes["none"]["mean_views"] == 1
    assert modes["dihedral8"]["rescored_fraction"] == 1 and modes["dihedral8"]["mean_views"] == 8
    r = modes["adaptive"]["rescored_fraction"]
    assert 0 <= r <= 1 and modes["adaptive"]["mean_views"] == pytest.approx(1 + 7 * r, abs=1e-3)
    assert modes["none"]["ratio_vs_one_view"] == 1.0
    assert out["class_agreement_vs_torch"] == 1.0 and out["prob_max_abs_diff_vs_torch"] < 1e-4
    assert min(out["score_ips"], out["plain_torch_ips"], out["model_only_ips"]) > 0
    # a second run with a smaller N on the same work dir scores exactly N (nothing left over from the first)
    out = _bench("--n", "12", "--factor", "0", "--plain-n", "8", "--batch-size", "8", "--model", str(package / "pkg"),
                 "--workdir", str(work), "--data", str(package / "data"), "--set", "tta=none")
    assert out["images"] == 12 and "images_10x" not in out and out["tta"] == "none"
    assert out["class_agreement_vs_torch"] == 1.0 and out["prob_max_abs_diff_vs_torch"] < 1e-4


def test_gpu_score_benchmark_runs_on_the_cpu(tmp_path):
    """bench/gpu_score.py with a small N on this CPU: both decode layouts end to end, the model alone."""
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_score.py"), "--n", "12", "--batch-size", "8",
                        "--seconds", "0.5", "--layouts", "actor,tasks", "--workdir", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["images"] == 12 and out["device"] in ("cpu", "cuda")
    assert out["execution_actor"]["decode"] == "actor" and out["execution_tasks"]["decode"] == "tasks"
    assert min(out["model_only_ips"], out["score_ips_actor"], out["score_ips_tasks"], out["decode_ips_per_core"]) > 0


def test_package_views_benchmark_smoke(package):
    """bench/package_views.py: training's 8-view pass with PyTorch and with the packaging model; same numbers."""
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "package_views.py"), "--model", str(package / "pkg"),
                        "--data", str(package / "data"), "--n", "8"], cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["images"] == 8 and out["views"] == 8
    assert out["packaging_backend"] == "OpenVINOModel"  # a CPU with OpenVINO installed
    assert out["max_abs_diff"] < 1e-3
    assert out["torch_ips"] > 0 and out["packaging_ips"] > 0


def test_augment_cost_benchmark_runs():
    """bench/augment_cost.py on a few small images: every codec choice of the policy and the network's step timed."""
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "augment_cost.py"), "--batch-size", "4", "--size", "48",
                        "--steps", "1", "--policies", "lab,lab_sensor"], cwd=ROOT, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert set(out["augment_ms_per_step"]) == {"lab/jpeg", "lab/jpeg+webp", "lab_sensor/jpeg", "lab_sensor/jpeg+webp"}
    assert min(out["augment_ms_per_step"].values()) > 0 and out["network_ms_per_step"] > 0
    r = subprocess.run([sys.executable, str(ROOT / "bench" / "augment_cost.py"), "--policies", "heavy"], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and "'heavy' is not a policy; allowed: none, study" in r.stderr
