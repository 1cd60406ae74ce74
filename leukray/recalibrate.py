"""`leukray calibrate`: refit a package's temperature(s), test-time cascade and out-of-distribution guard on
labelled images, and write the package with its new card to a new folder."""

from __future__ import annotations

import os
import tempfile
from typing import Any

import numpy as np

from .config import StorageOptions
from .evaluate import load_eval_data, log
from .inference import package_backend
from .ood import COLOUR_REFERENCE_FILE, OPTICS_REFERENCE_FILE, REFERENCE_FILE
from .tta import package_tta, resolve_tta

def calibrate(model_ref: str, data_uri: str, out_dir: str, split: str = "val", storage: StorageOptions | None = None,
              batch_size: int = 64, split_manifest: str | None = None, device: str = "auto",
              backend: str = "auto", tta: str = "package", ood: dict[str, Any] | None = None) -> dict[str, Any]:
    """Refit a package's temperature and out-of-distribution guard on labelled images and write the package,
    with the new card, to out_dir.

    Why: a lab's own images (stain, camera) shift confidences; refitting T on a labelled sample of them makes
    `confidence` and `needs_review` mean what they say there. Default split `val`: the training split's val rows
    when the package's manifest covers the data, else every image. The weights are copied unchanged (the argmax,
    so accuracy, cannot move); the card records the old temperature and where the new one was fitted. `tta`: fit
    for another test-time augmentation mode (e.g. `none` for a package that scores 8× faster, or `adaptive`:
    a temperature for one view and one for all eight, and the cascade threshold that decides which images get the
    eight, `leukray.calibration.fit_adaptive`); the new card's `tta` is that mode.

    The guard (`leukray.ood`): its reference is the training split's features when the package's manifest covers
    the data (so a package trained before the guard gets one without retraining; kept as it is when it was made in
    the same views with the same colour copies and `ood` changes nothing), and its thresholds are fitted on the same
    images as T. On a lab's own images (data the manifest does not cover) the package's guard is widened instead
    (`leukray.ood.widen_guard`): the images join its knn and colour references and every threshold stays the
    package's, so the lab's images count as in distribution and blank fields, other stains and photographs stay
    flagged; with `ood` overrides its thresholds are refitted on the lab's images. The reference holds the features
    of the mode's (full) views; an adaptive package's thresholds are fitted on the features of the path each row
    took (one view or the eight-view mean), as scoring computes them. A graph exported without the features output
    is re-exported from the weights. `ood`: OODConfig keys (method, k, in_fraction) overriding the package's."""
    import datetime as dt

    from . import storage as st
    from .calibration import FIT_DESCRIPTION, fit_mode
    from .inference import softmax
    from .metrics import expected_calibration_error
    from .ood import (STATS_DIM, OODConfig, fit_guard, load_guard, save_reference, split_outputs, structure_outdated,
                      widen_guard)
    from .registry import CARD, ONNX, export_onnx, image_stats_width, load_package, read_onnx
    from .train import select_device
    from .tta import view_ids

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    pkg = load_package(model_ref, storage)
    if out_dir.rstrip("/") == pkg.uri.rstrip("/") or (not st.is_remote(out_dir) and not st.is_remote(pkg.uri)
                                                      and os.path.abspath(out_dir) == os.path.abspath(pkg.uri)):
        raise ValueError(f"--out {out_dir} is the package itself; write the recalibrated package to a new folder "
                         "(a package, once written or published, is never changed in place)")
    tta_before = package_tta(pkg.card)
    tta_mode = resolve_tta(tta, pkg.card)
    k = len(pkg.classes)
    old_guard = load_guard(pkg.uri, pkg.card, storage)
    card_ood = pkg.card.get("ood") or {}
    trained = pkg.card.get("config") or {}  # the package's training config: its seed and augmentation
    seed = int(trained.get("seed", 0))
    old_made = card_ood.get("reference_made") or {}  # how the package's knn reference was made
    far = (card_ood.get("optics") or {}).get("far_fraction")  # carried over only where it differs from in_fraction
    ood_cfg = OODConfig.model_validate({**({kk: pkg.card["ood"][kk] for kk in ("method", "k", "in_fraction")}
                                           if pkg.card.get("ood") else {}),
                                        **{kk: old_made[key] for kk, key in
                                           (("augmented_copies", "augmented_copies"),
                                            ("degraded_copies", "degraded_copies"),
                                            ("reference_colour_copies", "colour_copies")) if key in old_made},
                                        **({"colour_in_fraction": pkg.card["ood"]["colour"]["in_fraction"],
                                            "colour_copies": pkg.card["ood"]["colour"]["copies"]}
                                           if (pkg.card.get("ood") or {}).get("colour") else {}),
                                        **({"far_fraction": far} if far not in (None, card_ood.get("in_fraction"))
                                           else {}),
                                        **(ood or {})})
    data = load_eval_data(data_uri, pkg.classes, pkg.image_size, split, pkg.uri, pkg.card, split_manifest, storage)
    with tempfile.TemporaryDirectory() as tmp:
        onnx_bytes = read_onnx(pkg, storage)
        reexported = image_stats_width(onnx_bytes) < STATS_DIM or structure_outdated(pkg.card)
        if reexported:  # exported before the graph returned its features, colour signature and today's structure
            export_onnx(pkg.model, pkg.image_size, os.path.join(tmp, ONNX))
            with open(os.path.join(tmp, ONNX), "rb") as fh:
                onnx_bytes = fh.read()
        model, backend_name = package_backend(pkg, select_device(device), batch_size, backend, storage, onnx_bytes)
        outputs, fitted = fit_mode(model, data.images, data.labels, tta_mode, k)
        logits, features = split_outputs(outputs.values, k)
        temperature = fitted["temperature"]
        probs = outputs.probs(k)
        rows = np.arange(len(data.labels))

        def nll(p: np.ndarray) -> float:
            return float(-np.log(np.clip(p[rows, data.labels], 1e-300, None)).mean())

        summary = {
            "temperature_before": pkg.temperature, "temperature": temperature,
            "tta_before": tta_before, "tta": tta_mode,
            "nll_before": nll(softmax(logits, pkg.temperature)), "nll": nll(probs),
            "ece": float(expected_calibration_error(data.labels, probs)),
            "n": len(data.paths), "errors": int((logits.argmax(1) != data.labels).sum()),
            "data": data_uri, "unreadable": data.unreadable, "split": data.split, "split_source": data.split_source,
            "backend": backend_name,
            "source_package": pkg.uri, "at": dt.datetime.now(dt.timezone.utc).isoformat(),
            "fit": FIT_DESCRIPTION, "onnx_reexported": reexported,
        }
        train_images = None
        widen = False

        def features_of(images: np.ndarray) -> np.ndarray:  # the training rows' features in this package's views
            return split_outputs(model.mean_views(images, view_ids(tta_mode)), k)[1]

        reuse_reference = (old_guard is not None and not ood and data.manifest_uri is not None
                           and view_ids(old_guard.fitted.get("tta") or "none") == view_ids(tta_mode)
                           and old_made.get("colour_copies", 0) == ood_cfg.reference_colour_copies)
        if reuse_reference:  # the reference a rebuild would make: the training rows' features in the same views
            reference, made = old_guard.reference, old_guard.fitted.get("reference_made")
            ref_source = f"the reference of {pkg.uri} (the training rows' features in the same views)"
        elif data.manifest_uri is not None and data.split != "train":
            from .train import guard_reference

            train_images = load_eval_data(data_uri, pkg.classes, pkg.image_size, "train", pkg.uri, pkg.card,
                                          data.manifest_uri, storage).images
            reference, made = guard_reference(features_of, train_images, ood_cfg, trained.get("augment", "none"),
                                              float(trained.get("augment_strength", 1.0)),
                                              float(trained.get("augment_zoom", 1.0)), seed,
                                              tuple(trained.get("augment_codecs", ("jpeg",))))
            ref_source = f"train rows of {data.manifest_uri}"
        elif old_guard is not None:
            reference, ref_source = old_guard.reference, f"the reference of {pkg.uri}"
            made = old_guard.fitted.get("reference_made")
            widen = not ood  # a lab's own sample joins the references; the thresholds stay the package's
        else:
            reference, ref_source, made = None, None, None
            log(f"calibrate: warning: {data_uri} is not covered by the package's split manifest and the package has "
                "no guard yet: no out-of-distribution guard (calibrate on the training data to add one)")
        optics = None
        if reference is not None and not widen and ood_cfg.optics_check:
            from .train import optics_reference

            if reuse_reference and old_guard.optics_reference is not None:
                optics = old_guard.optics_reference
            elif data.manifest_uri is not None and data.split != "train":
                if train_images is None:
                    train_images = load_eval_data(data_uri, pkg.classes, pkg.image_size, "train", pkg.uri, pkg.card,
                                                  data.manifest_uri, storage).images
                optics = optics_reference(features_of, train_images, ood_cfg, seed)
        colour_ref = colour_val = None
        old_colour = old_guard.colour_reference if old_guard is not None else None
        if reference is not None and not widen and (ood_cfg.colour_check or ood_cfg.structure_check):
            from .train import colour_envelopes

            needs_train = ood_cfg.colour_check and old_colour is None  # the colour check's reference: training images
            if needs_train and train_images is None and data.manifest_uri is not None and data.split != "train":
                train_images = load_eval_data(data_uri, pkg.classes, pkg.image_size, "train", pkg.uri, pkg.card,
                                              data.manifest_uri, storage).images
            if not needs_train or train_images is not None:
                colour_ref, colour_val = colour_envelopes(train_images, data.images, ood_cfg, seed,
                                                          reference=old_colour)
        card = dict(pkg.card, temperature=temperature, tta=tta_mode, calibration=summary)
        card.pop("ood", None)
        card.pop("adaptive", None)
        if "adaptive" in fitted:
            card["adaptive"] = dict(fitted["adaptive"], split=data.split, data=data_uri)
        guard = None
        if widen:
            samples = list(old_guard.fitted.get("lab_samples") or []) + [
                {"data": data_uri, "n": len(data.paths), "at": summary["at"]}]
            ref_source = f"{ref_source} + {len(data.paths)} image(s) of {data_uri}"
            guard = widen_guard(old_guard, features, temperature,
                                {"lab_samples": samples, "reference_split": ref_source}, logits=logits)
            card["ood"] = guard.card()
            summary["ood"] = {"method": guard.method, "threshold": guard.threshold,
                              "threshold_before": old_guard.threshold, "reference_added": len(data.paths),
                              "flagged_before": float((~old_guard.in_distribution(
                                  old_guard.scores(logits, features))).mean())}
        elif reference is not None:
            guard = fit_guard(reference, logits, features, temperature, ood_cfg,
                              fitted={"split": data.split, "n_val": len(data.paths), "data": data_uri,
                                      "reference_split": ref_source, "reference_made": made, "tta": tta_mode},
                              colour_reference=colour_ref, colour_val=colour_val, optics_features=optics)
            card["ood"] = guard.card()
            summary["ood"] = {"method": guard.method, "threshold": guard.threshold,
                              "threshold_before": old_guard.threshold if old_guard is not None else None}
        fs, path = st.filesystem(pkg.uri, storage)
        copied = ({CARD} | ({ONNX} if reexported else set())
                  | ({REFERENCE_FILE, COLOUR_REFERENCE_FILE, OPTICS_REFERENCE_FILE} if guard is not None else set()))
        for entry in fs.ls(path, detail=True):
            name = os.path.basename(entry["name"].rstrip("/"))
            if entry["type"] == "file" and name not in copied:
                fs.get_file(entry["name"], os.path.join(tmp, name))
        if guard is not None:
            save_reference(guard, tmp)
        st.write_json(os.path.join(tmp, CARD), card)
        st.upload_dir(tmp, out_dir, storage)
    ad = fitted.get("adaptive")
    log(f"calibrate: T {pkg.temperature:.4g} → {temperature:.4g} (tta {tta_before} → {tta_mode})"
        + (f"; adaptive: one-view T {ad['temperature_one_view']:.4g}, threshold {ad['threshold']:.4f}, "
           f"{ad['rescored_fraction']:.1%} re-scored" if ad else "") + f" on {summary['n']} image(s) of {data_uri} "
        f"({data.split}, {summary['errors']} error(s)); NLL {summary['nll_before']:.4f} → {summary['nll']:.4f}"
        + (f"; guard {guard.method} threshold {guard.threshold:.4g}" + (
            f", optics ratio threshold {guard.optics_threshold:.4g}" if guard.optics_threshold is not None else "")
           + f" (reference: {ref_source})" if guard else "")
        + f"  → {out_dir}")
    return {"out": out_dir, **summary}
