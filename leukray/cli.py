"""`leukray` command line: thin wrappers over the library (each subcommand parses, then calls one function)."""

from __future__ import annotations

import argparse
import json
import sys

from .config import ConfigError, load_config, parse_overrides
from .tta import TTA_CHOICES


def cmd_train(args: argparse.Namespace) -> int:
    from .train import TrainConfig, train

    overrides = parse_overrides(args.set)
    if args.data:
        overrides["data.root"] = args.data
    if args.epochs is not None:
        overrides["epochs"] = args.epochs
    cfg = load_config(TrainConfig, args.config, overrides)
    card = train(cfg, args.out)
    print(json.dumps({"out": args.out, "test": card["metrics"]["test"] and {
        k: card["metrics"]["test"][k] for k in ("accuracy", "macro", "n")}}, indent=2))
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from .synth import make_dataset

    out = make_dataset(args.out, per_class=args.per_class, size=args.size, seed=args.seed, duplicates=args.duplicates)
    print(out)
    return 0


def cmd_synth_ood(args: argparse.Namespace) -> int:
    from .synth import make_ood_folders

    print(make_ood_folders(args.out, source=args.source, per_folder=args.per_folder, size=args.size, seed=args.seed))
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .config import StorageOptions
    from .evaluate import evaluate

    report = evaluate(args.model, args.data, args.out, split=args.split,
                      storage=StorageOptions(endpoint_url=args.endpoint_url) if args.endpoint_url else None,
                      robustness=args.robustness, seed=args.seed, batch_size=args.batch_size,
                      split_manifest=args.split_manifest, review_threshold=args.review_threshold, device=args.device,
                      backend=args.backend, tta=args.tta, ood_dirs=args.ood,
                      benign_malignant_threshold=args.benign_malignant_threshold, perturbations=args.perturbations)
    summary = {"out": args.out, "model": report["model"]["name"], "version": report["model"]["version"],
               "split": report["split"], "n": report["n"], "accuracy": report["accuracy"],
               "macro_f1": report["macro_f1"], "ece": report["metrics"]["ece"], "tta": report["tta"],
               "review": {k: report["review"][k] for k in ("threshold", "benign_malignant_threshold", "flagged_fraction",
                                                           "errors_caught_fraction", "with_guard")}}
    if "robustness" in report:
        rob = report["robustness"]
        summary["robustness_worst"] = {k: rob["worst"][k] for k in ("perturbation", "severity", "accuracy", "macro_f1")}
        summary["robustness_most_silent"] = {k: rob["worst_silent"][k] for k in (
            "perturbation", "severity", "silent_error_rate", "silent_benign_malignant")}
        summary["robustness_most_flagged"] = {k: rob["max_flagged"][k] for k in (
            "perturbation", "severity", "flagged_fraction", "ood_fraction")}
    if "ood_folders" in report:
        summary["ood_folders"] = report["ood_folders"]["folders"]
    print(json.dumps(summary, indent=2))
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from .config import StorageOptions
    from .recalibrate import calibrate

    summary = calibrate(args.model, args.data, args.out, split=args.split,
                        storage=StorageOptions(endpoint_url=args.endpoint_url) if args.endpoint_url else None,
                        batch_size=args.batch_size, split_manifest=args.split_manifest, device=args.device,
                        backend=args.backend, tta=args.tta,
                        ood={k: v for k, v in (("method", args.ood_method), ("k", args.ood_k),
                                                ("in_fraction", args.ood_in_fraction),
                                                ("augmented_copies", args.ood_augmented_copies),
                                                ("degraded_copies", args.ood_degraded_copies),
                                                ("reference_colour_copies", args.ood_reference_colour_copies))
                                if v is not None})
    print(json.dumps(summary, indent=2))
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from . import score

    overrides = parse_overrides(args.set)
    for key in ("input", "output", "model"):
        if getattr(args, key):
            overrides[key] = getattr(args, key)
    if args.convert_legacy:
        overrides.setdefault("output", args.convert_legacy)
    cfg = load_config(score.ScoreConfig, args.config, overrides)
    if args.convert_legacy:
        out = score.convert_legacy(args.convert_legacy, cfg)
        print(json.dumps(out, indent=2))
        return 0
    if args.vacuum:
        removed = score.vacuum(cfg)
        print(json.dumps({"output": cfg.output, "retention_hours": cfg.vacuum_retention_hours,
                          "removed": len(removed), "files": removed[:50]}, indent=2))
        return 0
    record = score.run(cfg)
    print(score.summary(record), file=sys.stderr)
    print(score.main_summary_json(record))
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from .search import run_from_args

    return run_from_args(args, "leukray tune")


def _package_on_data_arguments(p: argparse.ArgumentParser, out_help: str, split: str) -> None:
    """What evaluate and calibrate share: a package, a labelled folder, which of its rows, how to run the model."""
    p.add_argument("--model", required=True, help="package folder (model_card.json) or model folder (LATEST), local or s3://")
    p.add_argument("--data", required=True, help="labelled image folder, local or s3://")
    p.add_argument("--out", required=True, help=out_help)
    p.add_argument("--split", choices=["test", "val", "train", "all"], default=split,
                   help=f"{split} (default): the split manifest's {split} rows when one covers the data, else all images")
    p.add_argument("--split-manifest", help="split manifest (Parquet) to take the split from; default: the package's")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "openvino"],
                   help="auto: OpenVINO fp32 on a CPU (as scoring), PyTorch on a GPU")
    p.add_argument("--tta", default="package", choices=list(TTA_CHOICES),
                   help="test-time augmentation: the package's mode (default, card `tta`) or none | flips4 | dihedral8 | "
                        "adaptive (one view; the 8 views only for images below the package's cascade threshold)")
    p.add_argument("--endpoint-url", help="S3-compatible endpoint (default $AWS_ENDPOINT_URL)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="leukray", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="fine-tune MobileNetV2 on a labelled folder, evaluate, write a model package")
    t.add_argument("--data", help="labelled image folder, local or s3:// (overrides data.root)")
    t.add_argument("--out", required=True, help="output folder or s3:// URI (model package, metrics, plots)")
    t.add_argument("--config", help="YAML config (see configs/train.yaml)")
    t.add_argument("--epochs", type=int)
    t.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key (dotted)")
    t.set_defaults(func=cmd_train)

    s = sub.add_parser("synth", help="generate a synthetic labelled smear dataset (demo and tests)")
    s.add_argument("--out", required=True)
    s.add_argument("--per-class", type=int, default=60)
    s.add_argument("--size", type=int, default=96)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--duplicates", type=int, default=0)
    s.set_defaults(func=cmd_synth)

    so = sub.add_parser("synth-ood", help="generate folders of images that are not in-distribution smears "
                        "(textures, blank and defocused fields, photographs, other stains, screenshots, tissue, "
                        "smears at another magnification) for evaluate --ood")
    so.add_argument("--out", required=True)
    so.add_argument("--source", help="folder of real smear images for the defocus, other_stain, magnified and "
                    "wide_field folders "
                    "(default: generated smears)")
    so.add_argument("--per-folder", type=int, default=40)
    so.add_argument("--size", type=int, default=224)
    so.add_argument("--seed", type=int, default=0)
    so.set_defaults(func=cmd_synth_ood)

    e = sub.add_parser("evaluate", help="evaluate a model package on a labelled folder (metrics, plots, robustness)")
    _package_on_data_arguments(e, "output folder or s3:// URI (evaluation.json, plots, robustness.csv)", "test")
    e.add_argument("--robustness", action="store_true", help="also re-score under every perturbation x severity")
    e.add_argument("--perturbations", nargs="+", metavar="FAMILY[=S,…]",
                   help="re-score under these perturbation families only (implies --robustness; the same images and "
                        "numbers as in the full suite), e.g. --perturbations channel_shift impulse_noise; "
                        "FAMILY=S1,S2 takes these severities instead of the suite's, e.g. past its strongest: "
                        "magnification=0.5,2 blur=4,6")
    e.add_argument("--seed", type=int, default=0, help="seed of the random perturbations (noise) and the sample grid")
    e.add_argument("--review-threshold", type=float, help="needs_review confidence threshold (default: card, else 0.8)")
    e.add_argument("--benign-malignant-threshold", type=float,
                   help="also needs_review when the benign-vs-malignant probability is below this (default: card, else 0.9)")
    e.add_argument("--ood", nargs="+", metavar="DIR", help="folders of images that are not in-distribution smears: "
                   "AUROC and flagged fraction of the guard (knn) and of max-softmax per folder")
    e.set_defaults(func=cmd_evaluate)

    c = sub.add_parser("calibrate", help="refit a package's temperature on labelled images; write the package to --out")
    _package_on_data_arguments(c, "folder or s3:// URI for the recalibrated package", "val")
    c.add_argument("--ood-method", choices=["knn", "energy", "msp"], help="guard method (default: the package's, else knn)")
    c.add_argument("--ood-k", type=int, help="knn: which neighbour (default: the package's, else 10)")
    c.add_argument("--ood-in-fraction", type=float,
                   help="fraction of the calibration images counted in distribution (default: the package's, else 0.97)")
    c.add_argument("--ood-augmented-copies", type=int, help="copies of each training image under the training "
                   "augmentation in the knn reference (default: the package's, else 0)")
    c.add_argument("--ood-degraded-copies", type=int, help="copies of each training image under one camera or lab "
                   "defect each (blur, noise, JPEG, pixelation, over-exposure, …) in the knn reference (default: the "
                   "package's, else 0)")
    c.add_argument("--ood-reference-colour-copies", type=int, help="copies of each training image in another lab's "
                   "colours in the knn reference (default: the package's, else 1)")
    c.set_defaults(func=cmd_calibrate)

    sc = sub.add_parser("score", help="batch-score an image archive with a model package on Ray Data → a Delta table")
    sc.add_argument("--config", help="YAML config (see configs/score.yaml)")
    sc.add_argument("--input", help="archive prefix, local or s3://bucket/prefix (overrides input)")
    sc.add_argument("--output", help="the results Delta table, local or s3:// (overrides output)")
    sc.add_argument("--model", help="package folder or model folder (LATEST), local or s3:// (overrides model)")
    sc.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key (dotted)")
    sc.add_argument("--vacuum", action="store_true",
                    help="score nothing: delete the table's uncommitted files older than vacuum_retention_hours")
    sc.add_argument("--convert-legacy", metavar="OUTPUT",
                    help="score nothing: convert OUTPUT, written in the previous layout (results/ + _runs/), into "
                         "the results Delta table at the same place (rows and run records kept; once)")
    sc.set_defaults(func=cmd_score)

    tu = sub.add_parser("tune", help="hyperparameter search on Ray Tune (Optuna TPE + ASHA); publishes the winner")
    from .search_args import add_arguments as _tune_arguments

    _tune_arguments(tu)
    tu.set_defaults(func=cmd_tune)

    from .query_cli import add_query_commands

    add_query_commands(sub)

    from .review_cli import add_review_commands

    add_review_commands(sub)

    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, ValueError, LookupError, OSError) as err:
        print(f"leukray {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
