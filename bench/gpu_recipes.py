"""Train and evaluate training recipes × seeds concurrently on one GPU, from a pack made by bench/gpu_pack.py.

Written for the lent device machine (15 minutes in all): every run is `leukray train` then `leukray evaluate
--robustness`, several at once on the one GPU; results are appended to <out>/results.jsonl as each run ends, so a
deadline loses only the runs still going. Needs python3 with torch, torchvision, numpy, pyarrow, pillow, scipy,
scikit-learn, matplotlib, fsspec, pyyaml and the carried pydantic wheels on PYTHONPATH.

    PYTHONPATH=/tmp/site:$PWD python3 bench/gpu_recipes.py --carry .gpu-carry --work /tmp/lk --out $OUT
"""

from __future__ import annotations

import argparse
import csv
import json
import lzma
import os
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

RECIPES: dict[str, tuple[str, list[str]]] = {
    # the shipped default: Adam 1e-4 constant, `robust` colour/camera on a quarter of the images, no zoom, EMA
    "default": ("configs/train.yaml", []),
    # the study's recipe as the issue describes it
    "study": ("configs/study.yaml", []),
    # the previous default: colour/camera on half of the images, magnification jitter up to 1.4x
    "half-zoom": ("configs/train.yaml", ["augment_p=0.5", "augment_zoom=1.4"]),
    # colour/camera on every image, magnification jitter up to 1.4x
    "all-zoom": ("configs/train.yaml", ["augment_p=1", "augment_zoom=1.4"]),
}

T0 = time.time()
LOCK = threading.Lock()


def say(msg: str, log: str) -> None:
    line = f"[{time.time() - T0:6.1f}s] {msg}"
    print(line, flush=True)
    with LOCK, open(log, "a") as fh:
        fh.write(line + "\n")


def unpack(carry: str, work: str) -> tuple[str, str, str]:
    """Data folder, weights file and manifest on the device, rebuilt from the pack."""
    data = os.path.join(work, "data")
    with open(os.path.join(carry, "index.json")) as fh:
        index = json.load(fh)
    for rel, digest in index.items():
        os.makedirs(os.path.dirname(os.path.join(data, rel)), exist_ok=True)
        shutil.copyfile(os.path.join(carry, "images", digest + ".jpg"), os.path.join(data, rel))
    with open(os.path.join(carry, "weights.json")) as fh:
        meta = json.load(fh)
    with open(os.path.join(carry, "weights.xz"), "rb") as fh:
        raw = np.frombuffer(lzma.decompress(fh.read()), dtype=np.uint8)
    state, at = {}, 0
    for t in meta["tensors"]:
        dtype = np.dtype(t["dtype"])
        n = int(np.prod(t["shape"], dtype=np.int64)) * dtype.itemsize
        a = raw[at:at + n].reshape(dtype.itemsize, -1).T.copy().view(dtype).reshape(t["shape"])
        state[t["key"]] = torch.from_numpy(a)
        at += n
    weights = os.path.join(work, "mobilenet_v2_imagenet.pt")
    torch.save(state, weights)
    manifest = os.path.join(work, "split.parquet")
    shutil.copyfile(os.path.join(carry, "split.parquet"), manifest)
    return data, weights, manifest


def run_one(recipe: str, seed: int, a: argparse.Namespace, data: str, weights: str, manifest: str,
            common: list[str], log: str) -> dict:
    config, sets = RECIPES[recipe]
    name = f"{recipe}-s{seed}"
    out = os.path.join(a.work, "runs", name)
    rec: dict = {"recipe": recipe, "seed": seed, "config": config, "set": sets + common}
    if time.time() - T0 > a.launch_by:
        rec["status"] = "not started (launch deadline)"
        return rec
    py = [sys.executable, "-m", "leukray.cli"]
    train = py + ["train", "--data", data, "--out", out, "--config", config, "--set", f"seed={seed}",
                  "--set", f"model.weights={weights}", "--set", f"split.manifest={manifest}"]
    for s in sets + common:
        train += ["--set", s]
    evaluate = py + ["evaluate", "--model", out, "--data", data, "--out", os.path.join(out, "eval"),
                     "--split-manifest", manifest, "--seed", "0", "--batch-size", "256"] + (["--robustness"] if a.robustness else [])
    for step, cmd in (("train", train), ("evaluate", evaluate)):
        t = time.time()
        left = a.deadline - (t - T0)
        if left < 20:
            rec["status"] = f"{step}: not started (deadline)"
            break
        say(f"{name}: {step} starts", log)
        with open(os.path.join(a.work, f"{name}.{step}.log"), "w") as fh:
            try:
                rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, timeout=left).returncode
            except subprocess.TimeoutExpired:
                rc = "timeout"
        rec[f"{step}_wall_s"] = round(time.time() - t, 1)
        say(f"{name}: {step} rc={rc} in {rec[f'{step}_wall_s']}s", log)
        if rc != 0:
            rec["status"] = f"{step} failed: {rc}"
            with open(os.path.join(a.work, f"{name}.{step}.log")) as fh:
                rec["log_tail"] = fh.read()[-3000:]
            break
    else:
        rec["status"] = "ok"
    card_path, ev_path = os.path.join(out, "model_card.json"), os.path.join(out, "eval", "evaluation.json")
    if os.path.exists(card_path):
        with open(card_path) as fh:
            card = json.load(fh)
        with open(os.path.join(out, "history.json")) as fh:
            hist = json.load(fh)
        t = card["metrics"]["test"]
        rec["train"] = {"test_accuracy": t["accuracy"], "test_macro_f1": t["macro"]["f1"], "tta": card.get("tta", "none"),
                        "temperature": card["temperature"], "best_epoch": card["best_epoch"],
                        "epochs_run": card["epochs_run"], "val_accuracy": card["metrics"]["val"]["accuracy"],
                        "epoch_time_s": [round(h["epoch_time_s"], 2) for h in hist],
                        "val_acc_by_epoch": [round(h["val_accuracy"], 4) for h in hist]}
    if os.path.exists(ev_path):
        with open(ev_path) as fh:
            ev = json.load(fh)
        rec["eval"] = {k: ev.get(k) for k in ("accuracy", "macro_f1", "n", "wall_time_s", "tta")}
        rec["eval"].update({"ece": ev["metrics"]["ece"], "benign_vs_malignant": ev["metrics"].get("benign_vs_malignant"),
                            "review": ev["review"]})
        if "robustness" in ev:
            rec["robustness"] = [[r["perturbation"], r["severity"], r["accuracy"]] for r in ev["robustness"]["results"]]
        with open(os.path.join(out, "eval", "predictions.csv"), newline="") as fh:
            rec["errors"] = [[r["path"], r["actual"], r["predicted"], r["confidence"]]
                             for r in csv.DictReader(fh) if r["correct"] == "False"]
    with LOCK, open(os.path.join(a.out, "results.jsonl"), "a") as fh:
        fh.write(json.dumps(rec) + "\n")
    return rec


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--carry", default=".gpu-carry")
    ap.add_argument("--work", default="/tmp/leukray-gpu")
    ap.add_argument("--out", required=True)
    ap.add_argument("--recipes", default="default,study,half-zoom,all-zoom", help=f"comma-separated: {', '.join(RECIPES)}")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--concurrency", type=int, default=6)
    ap.add_argument("--launch-by", type=float, default=300, help="start no run after this many seconds")
    ap.add_argument("--deadline", type=float, default=470, help="kill what still runs after this many seconds")
    ap.add_argument("--no-robustness", dest="robustness", action="store_false")
    ap.add_argument("--set", action="append", default=[], help="extra override for every run (e.g. image_size=64)")
    a = ap.parse_args()
    for r in a.recipes.split(","):
        if r not in RECIPES:
            ap.error(f"recipe {r!r} unknown; allowed: {', '.join(RECIPES)}")
    os.makedirs(a.out, exist_ok=True)
    os.makedirs(a.work, exist_ok=True)
    log = os.path.join(a.out, "log.txt")
    env = {"torch": torch.__version__, "cuda": torch.cuda.is_available(),
           "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "cpus": os.cpu_count()}
    say(f"environment {json.dumps(env)}", log)
    os.environ.setdefault("LEUKRAY_CACHE", os.path.join(a.work, "cache"))
    os.environ["LEUKRAY_OFFLINE"] = "1"
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    data, weights, manifest = unpack(a.carry, a.work)
    say(f"unpacked {data}, {weights}", log)
    common = [f"epochs={a.epochs}", "num_threads=2", *a.set]
    # decode once into the shared cache before the runs start (they would all decode at the same time)
    from leukray.config import parse_config
    from leukray.train import TrainConfig, prepare_data
    size = next((int(s.split("=", 1)[1]) for s in a.set if s.startswith("image_size=")), 224)
    prepare_data(parse_config(TrainConfig, {"data": {"root": data}, "split": {"manifest": manifest}, "image_size": size}))
    say("decode cache ready", log)
    smi = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu,memory.used", "--format=csv,noheader",
                            "-l", "10"], stdout=open(os.path.join(a.out, "gpu_util.txt"), "w"),
                           stderr=subprocess.DEVNULL) if shutil.which("nvidia-smi") else None
    jobs = [(r, int(s)) for r in a.recipes.split(",") for s in a.seeds.split(",")]
    with ThreadPoolExecutor(a.concurrency) as pool:
        recs = list(pool.map(lambda j: run_one(j[0], j[1], a, data, weights, manifest, common, log), jobs))
    if smi is not None:
        smi.terminate()
    summary = {}
    for r in recs:
        s = summary.setdefault(r["recipe"], {})
        s[f"s{r['seed']}"] = {"status": r["status"], "test_accuracy": r.get("train", {}).get("test_accuracy"),
                              "errors": len(r["errors"]) if "errors" in r else None,
                              "worst": min(r["robustness"], key=lambda x: x[2]) if r.get("robustness") else None}
    with open(os.path.join(a.out, "summary.json"), "w") as fh:
        json.dump({"environment": env, "wall_s": round(time.time() - T0, 1), "recipes": summary}, fh, indent=1)
    say(json.dumps(summary), log)
    return 0


if __name__ == "__main__":
    sys.exit(main())
