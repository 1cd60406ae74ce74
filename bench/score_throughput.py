#!/usr/bin/env python
"""Scoring throughput, side by side in one run, on N images (default 4000 generated 224x224 JPEG smears):

  score_ips       (per test-time mode: none / adaptive / dihedral8 side by side, `modes`) the scoring job end to end (leukray.score.run: listing, the Ray Data model actor that reads,
                  decodes and scores with the shipped CPU backend, the workers' Parquet files of the results table,
                  the commits; actor start-up included) on a local Ray started beforehand; score_first_rows_s =
                  start-up until the first data file is written (max_rows_per_file rows), score_steady_ips = the
                  rate after that (null when the run wrote its files at the end); driver_result_rows = result rows
                  that passed through the driver (0: it only receives each data file's metadata)
  plain_torch_ips a plain PyTorch DataLoader loop (decode_image in 2 workers, the same package's torch model fp32,
                  once per test-time view as the scoring run)
  model_only_ips  the model alone on pre-decoded uint8 tensors with the shipped backend and precision (the same
                  actor class); on those images also the largest calibrated-probability difference and the class
                  agreement against the package's PyTorch fp32 model (meaningful with --model, a trained package)
then the scoring job again at factor x N (hard links of the same files under other names), each with the peak RSS
of the whole process tree (this driver + raylet + gcs + every Ray worker; psutil, sampled every 0.1 s).
`modes` holds, per test-time mode, score_ips, the re-scored fraction (rows scored in more than one view, read back
from the table's `views` column), mean views and the ratio to one view's throughput; the top-level numbers are the
first mode's (adaptive needs a package with the cascade: the default one, trained with configs/train.yaml, has it). The model-only and plain loops run
the first mode's views (adaptive: the views the run used, as a mean). The measurements at N run back to back; `loadavg_before` has the 1-minute load average before each (the
machine is shared: compare numbers only within one run). Prints one JSON object.

    .venv/bin/python bench/score_throughput.py [--n 4000] [--factor 10] [--data ../shared/data/taleqani-all]
        [--model runs/taleqani/] [--set cpu_precision=f32] [--set backend=onnx] [--modes adaptive,none,dihedral8]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402


class PeakRSS:
    """Peak of the summed RSS over this process and all its descendants (Ray's raylet, gcs, workers)."""

    def __init__(self, interval: float = 0.1):
        import ray  # noqa: F401  (puts Ray's vendored psutil on sys.path)
        import psutil

        self.psutil = psutil
        self.me = psutil.Process()
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def sample(self) -> int:
        total = 0
        try:
            procs = [self.me] + self.me.children(recursive=True)
        except self.psutil.Error:
            procs = [self.me]
        for p in procs:
            try:
                total += p.memory_info().rss
            except self.psutil.Error:
                pass
        return total

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.sample())
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRSS:
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.sample())

    @property
    def mb(self) -> float:
        return round(self.peak / 2**20, 1)


def make_images(folder: Path, n: int, size: int = 224) -> list[Path]:
    from leukray import CLASSES
    from leukray.synth import smear_image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        p = folder / f"img-{i:06d}.jpg"
        if not p.exists():
            smear_image(CLASSES[i % len(CLASSES)], rng, size=size).save(p, "JPEG", quality=90)
        out.append(p)
    keep = set(out)
    for p in folder.iterdir():  # a folder left by a larger --n would otherwise be scored whole
        if p not in keep:
            p.unlink()
    return out


def link_copies(files: list[Path], folder: Path, factor: int) -> None:
    shutil.rmtree(folder, ignore_errors=True)  # exactly factor x these files
    for k in range(factor):
        d = folder / f"copy-{k:02d}"
        d.mkdir(parents=True, exist_ok=True)
        for p in files:
            os.link(p, d / p.name)


def plain_torch(files: list[Path], pkg, batch_size: int, workers: int, tta: str, mean_views: float = 1.0) -> float:
    """The plain loop in a fixed mode; adaptive: one view for every image plus the other seven views for the
    re-scored fraction (mean_views - 1) / 7 of each batch."""
    import torch
    from torch.utils.data import DataLoader, Dataset

    from leukray.images import decode_image
    from leukray.tta import torch_views

    class Files(Dataset):
        def __len__(self):
            return len(files)

        def __getitem__(self, i):
            return torch.from_numpy(decode_image(files[i].read_bytes(), pkg.image_size)).permute(2, 0, 1)

    loader = DataLoader(Files(), batch_size=batch_size, num_workers=workers)
    model = pkg.model.eval()
    n = 0
    t = time.perf_counter()
    with torch.inference_mode():
        for x in loader:
            if tta == "adaptive":
                model(x.float())
                extra = int(round(len(x) * (mean_views - 1) / 7))
                if extra:
                    for v in list(torch_views(x[:extra].float(), "dihedral8"))[1:]:
                        model(v)
            else:
                for v in torch_views(x.float(), tta):
                    model(v)
            n += len(x)
    return n / (time.perf_counter() - t)


def trained_package(work: Path) -> Path:
    """A 224 px package trained briefly on generated smears (cached in the work dir): scoring with bf16 re-scores
    uncertain images in f32, so the model must be as confident as a trained one for the numbers to mean anything."""
    import subprocess

    from leukray import registry
    from leukray.synth import make_dataset

    pkg = work / "model-224-synth"
    if not (pkg / registry.CARD).exists():
        make_dataset(work / "train-data", per_class=64, size=224, seed=1)
        subprocess.run([sys.executable, "-m", "leukray.cli", "train", "--data", str(work / "train-data"), "--out",
                        str(pkg), "--epochs", "6", "--config", str(Path(__file__).resolve().parents[1] / "configs" / "train.yaml"),
                        "--set", "image_size=224", "--set", "ema_decay=0"],  # 64 steps: too few to average
                       check=True, stdout=subprocess.DEVNULL)
    return pkg


def adaptive_package(pkg_dir: Path, data: str | None, work: Path) -> Path:
    """The package as it is when its card has the adaptive cascade, else a copy calibrated for it on `data`'s
    validation rows (`leukray calibrate --tta adaptive`), cached in the work dir."""
    import json

    if "adaptive" in json.loads((pkg_dir / "model_card.json").read_text()):
        return pkg_dir
    if not data:
        sys.exit(f"{pkg_dir} has no adaptive cascade: pass --calibrate-data (its labelled images) or calibrate it "
                 "with leukray calibrate --tta adaptive")
    out = work / f"{pkg_dir.name}-adaptive"
    if not (out / "model_card.json").exists():
        from leukray.recalibrate import calibrate

        calibrate(str(pkg_dir), data, str(out), tta="adaptive")
    return out


def model_only(files: list[Path], package_dir: str, batch_size: int, backend: str, precision: str, tta: str
               ) -> tuple[float, dict]:
    """Model-alone throughput of the shipped backend, and how its calibrated probabilities compare with the
    package's PyTorch fp32 model on the same images."""
    import datetime as dt

    import torch

    from leukray import registry
    from leukray.images import decode_image
    from leukray.inference import default_threads, softmax as softmax_t, tta_logits
    from leukray.score import _Scorer
    from leukray.tta import ADAPTIVE

    pkg = registry.load_package(package_dir)
    x = np.stack([decode_image(p.read_bytes(), pkg.image_size) for p in files])
    scorer = _Scorer(package_dir, None, "cpu", backend, default_threads(), 0.7, "bench", dt.datetime.now(dt.timezone.utc),
                     precision, tta=tta)
    from leukray.ood import split_outputs

    def step(b: np.ndarray) -> np.ndarray:
        """What the actor does per batch: the model's outputs, then the out-of-distribution guard if any."""
        out = scorer.outputs(b)
        logits, features = split_outputs(out.values, len(pkg.classes))
        if scorer.guard is not None:
            scorer.guard.scores(logits, features)
        return out

    step(x[:batch_size])  # warm-up
    t = time.perf_counter()
    outs = [step(x[i:i + batch_size]) for i in range(0, len(x), batch_size)]
    ips = len(x) / (time.perf_counter() - t)
    k = len(pkg.classes)
    got = np.concatenate([o.probs(k) for o in outs])
    views = np.concatenate([o.views for o in outs])
    temps = np.concatenate([o.temperature for o in outs])
    def torch_logits(b: np.ndarray) -> np.ndarray:
        with torch.inference_mode():
            return pkg.model.eval()(torch.from_numpy(b).permute(0, 3, 1, 2).float()).numpy()

    def ref_logits(b: np.ndarray, n_views: int) -> np.ndarray:
        return tta_logits(torch_logits, b, "dihedral8" if n_views == 8 else "none" if n_views == 1 else tta)

    # the reference: the torch fp32 model in the views each row took, with that path's temperature
    ref = np.concatenate([softmax_t(ref_logits(x[i:i + 1], int(views[i])), temps[i:i + 1]) for i in range(len(x))]) \
        if tta == ADAPTIVE else \
        np.concatenate([softmax_t(tta_logits(torch_logits, x[i:i + batch_size], tta), temps[i:i + batch_size])
                        for i in range(0, len(x), batch_size)])
    agree = {"prob_max_abs_diff_vs_torch": float(np.abs(got - ref).max()),
             "class_agreement_vs_torch": float((got.argmax(1) == ref.argmax(1)).mean()),
             "agreement_images": len(x),
             "model_only_mean_views": float(views.mean()),
             "bf16_error": scorer.bf16.error if scorer.bf16 else None,
             "bf16_kept": bool(scorer.bf16 and scorer.bf16.kept),
             "f32_recheck_fraction": scorer.bf16.rechecked / scorer.bf16.images if scorer.bf16 and scorer.bf16.images
             else None}
    return ips, agree


def score_job(input_dir: str, output_dir: str, package_dir: str, batch_size: int, extra: dict) -> tuple[float, float, dict]:
    from leukray.score import ScoreConfig, run

    cfg = ScoreConfig(input=input_dir, output=output_dir, model=package_dir, batch_size=batch_size, **extra)
    with PeakRSS() as mem:
        t = time.perf_counter()
        m = run(cfg)
        wall = time.perf_counter() - t
    n = m["counts"]["scored"] + m["counts"]["errors"]
    return n / wall, mem.mb, m


def views_of(output_dir: str) -> dict:
    """Re-scored fraction and mean views of the rows a run wrote (the table's `views` column)."""
    from deltalake import DeltaTable

    v = DeltaTable(output_dir).to_pyarrow_table(columns=["views"])["views"].drop_null().to_numpy()
    return {"rescored_fraction": round(float((v > 1).mean()), 4) if len(v) else None,
            "mean_views": round(float(v.mean()), 3) if len(v) else None}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=4000)
    ap.add_argument("--factor", type=int, default=10, help="second scoring run on factor x N images (0: skip)")
    ap.add_argument("--data", help="use the first N images of this folder (recursive) instead of generated ones")
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "leukray-bench-score"))
    ap.add_argument("--model", help="a trained package (default: a 224 px package trained 6 epochs on generated "
                                    "smears, cached in the work dir)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--plain-n", type=int, default=1000, help="images for the (slow) plain DataLoader loop")
    ap.add_argument("--plain-workers", type=int, default=2)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra ScoreConfig keys")
    ap.add_argument("--calibrate-data", help="labelled images to fit the adaptive cascade on when the package has "
                                            "none (default package: its generated training data)")
    ap.add_argument("--modes", default="adaptive,none,dihedral8",
                    help="test-time modes scored side by side (comma-separated; the first is the main one)")
    args = ap.parse_args()


    import yaml

    from leukray import registry
    from leukray.images import is_image_name
    from leukray.score import init_ray, ScoreConfig

    work = Path(args.workdir)
    extra = {k: yaml.safe_load(v) for k, v in (s.split("=", 1) for s in args.set)}
    load_start = os.getloadavg()
    if args.data:
        files = sorted(p for p in Path(args.data).rglob("*") if p.is_file() and is_image_name(p.name))[: args.n]
        base = work / "data-given"  # rebuilt every run: exactly these files, nothing left from another run
        shutil.rmtree(base, ignore_errors=True)
        base.mkdir(parents=True)
        for i, p in enumerate(files):
            q = base / f"{i:06d}{p.suffix}"
            os.link(p, q) if os.stat(p).st_dev == os.stat(base).st_dev else shutil.copy(p, q)
        files = sorted(base.iterdir())
    else:
        base = work / "data-n"
        files = make_images(base, args.n)
    pkg_dir = Path(args.model) if args.model else trained_package(work)
    modes = [m for m in args.modes.split(",") if m]
    if "tta" in extra:
        modes = [extra.pop("tta")]
    if "adaptive" in modes:
        pkg_dir = adaptive_package(pkg_dir, args.calibrate_data or (None if args.model else str(work / "train-data")),
                                   work)
    pkg = registry.load_package(str(pkg_dir))

    init_ray(ScoreConfig())
    out_10 = work / "out-10x"
    shutil.rmtree(out_10, ignore_errors=True)

    load, per_mode, runs = {}, {}, {}
    for mode in modes:
        out = work / f"out-n-{mode}"
        shutil.rmtree(out, ignore_errors=True)
        load[f"score_{mode}"] = os.getloadavg()[0]
        ips, rss, m = score_job(str(base), str(out), str(pkg_dir), args.batch_size, dict(extra, tta=mode))
        runs[mode] = (ips, rss, m)
        per_mode[mode] = {"score_ips": round(ips, 1), "score_pipeline_ips": m["throughput"]["images_per_s"],
                          "peak_rss_mb": rss, **views_of(str(out))}
    one = per_mode.get("none", {}).get("score_ips")
    for mode in per_mode:
        per_mode[mode]["ratio_vs_one_view"] = round(per_mode[mode]["score_ips"] / one, 3) if one else None
    score_ips, rss_n, m_n = runs[modes[0]]
    tta = m_n["execution"]["tta"]
    load["model_only"] = os.getloadavg()[0]
    cfg = ScoreConfig(input="-", output="-", model="-", **extra)
    # In its own process: OpenVINO's thread pool and torch's forked DataLoader workers do not mix in one process.
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=mp.get_context("spawn")) as ex:
        model_ips, agreement = ex.submit(model_only, files[: min(len(files), 512)], str(pkg_dir), args.batch_size,
                                         m_n["execution"]["backend"], cfg.cpu_precision, tta).result()
    load["plain"] = os.getloadavg()[0]
    plain_ips = plain_torch(files[: args.plain_n], pkg, args.batch_size, args.plain_workers, tta,
                            per_mode[modes[0]]["mean_views"] or 1.0)
    tp = m_n["throughput"]
    result = {
        "images": len(files),
        "score_ips": round(score_ips, 1),
        "score_pipeline_ips": m_n["throughput"]["images_per_s"],
        "score_first_rows_s": tp["first_rows_s"],
        "score_steady_ips": (round(m_n["rows"] / (tp["pipeline_s"] - tp["first_rows_s"]), 1)
                             if tp["first_rows_s"] is not None and tp["pipeline_s"] - tp["first_rows_s"] > 1.0
                             else None),
        "driver_result_rows": m_n["driver"]["result_rows"],
        "data_files": m_n["files"],
        "commits": m_n["commits"],
        "plain_torch_ips": round(plain_ips, 1),
        "model_only_ips": round(model_ips, 1),
        "ratio_vs_plain": round(score_ips / plain_ips, 2),
        "peak_rss_mb": rss_n,
        "backend": m_n["execution"]["backend"],
        "precision": m_n["execution"]["precision"],
        "tta": tta,
        "modes": per_mode,
        "ood_guard": m_n["execution"].get("ood"),
        "batch_size": args.batch_size,
        "model": str(args.model or "224 px, 6 epochs on generated smears"),
        **{k: round(v, 6) if isinstance(v, float) else v for k, v in agreement.items()},
    }
    if args.factor:
        data_10 = work / "data-10x"
        link_copies(files, data_10, args.factor)
        load["score_10x"] = os.getloadavg()[0]
        ips_10, rss_10, m_10 = score_job(str(data_10), str(out_10), str(pkg_dir), args.batch_size,
                                         dict(extra, tta=modes[0]))
        result.update({"images_10x": m_10["counts"]["seen"], "score_ips_10x": round(ips_10, 1),
                       "peak_rss_mb_10x": rss_10, "rss_ratio_10x": round(rss_10 / rss_n, 2)})
    result.update({"cpus": os.cpu_count(), "loadavg_start": [round(x, 2) for x in load_start],
                   "loadavg_before": {k: round(v, 2) for k, v in load.items()},
                   "loadavg_end": [round(x, 2) for x in os.getloadavg()], "extra_config": extra})
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
