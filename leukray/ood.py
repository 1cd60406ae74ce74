"""The out-of-distribution guard: is this image a smear like the ones the model was trained on?

Why: the calibrated confidence answers "which of the four classes", assuming the image is such a smear. Another
lab's stain, a blank or defocused field, debris, a screenshot or a photo of a label still gets one of the four
classes, often confidently. The guard looks at the features the network already computes (its pooled 1280-d
MobileNetV2 features, averaged over the test-time views like the logits) and flags images far from every
training image, so a wrong answer on a foreign input becomes a review item instead of a silent error.

Methods (every score: higher = further from the training data):
- `knn` (default; Sun et al., ICML 2022, arXiv 2204.06507): distance from the L2-normalised feature to its k-th
  nearest neighbour among the training split's L2-normalised features. No distribution assumed; strong on the
  OpenOOD v1.5 benchmark (arXiv 2306.09301).
- `energy` (Liu et al., NeurIPS 2020): -T·logsumexp(logits / T).
- `msp`: 1 - the calibrated maximum softmax probability (the confidence alone), for comparison.

Fit (`fit_guard`, at training or `leukray calibrate` time): the reference set is the training split's normalised
features in float16 (a package file); `augmented_copies` (default 0) adds copies of each training image under the
training augmentation (`leukray.augment.augment_images`). Measured over the robustness suite: one or two copies
flag hardly fewer shifted images (mean 8.0 % → 7.8 %) and let more benign ↔ malignant errors through unflagged
(docs/results.md), so by default it is 0. What the reference does hold by
default is one copy of each training image in another lab's colours (`reference_colour_copies`: channel gains,
exposure, dye amounts, no blur or noise): on the same package it halved the flagged fraction under exposure ×1.5 and
brightness ×1.2 and kept every out-of-distribution folder flagged as before (docs/results.md). `degraded_copies`
(default 0) adds copies under one camera defect each (`leukray.perturb.degraded_copy`): one copy took a seventh off
the review load over the suite and let 4 more errors through unflagged, one of them benign ↔ malignant.
Each method's threshold is the `in_fraction` quantile (default 0.97) of its scores on the validation split, so
that fraction of in-distribution images counts as in distribution.

Colour check (joins `knn`): the pooled features are trained to ignore colour (another lab's camera and stain must
not change the answer), so they hardly see a smear whose colours no stain gives — red and blue swapped (an RGB/BGR
mix-up), inverted, grey, another dye's hue. The graph also returns the input's colour signature
(`leukray.colour.signature`: the stain's optical-density direction, its nuclei's, their distance from grey); the
reference holds the training images' signatures under the colour responses of other cameras and stain batches
(`leukray.colour.signature_envelope`: channel gains, exposure, dye amounts), and its threshold is the
`colour_in_fraction` quantile (default 0.995) of the validation images' signatures under the same. An image whose
signature is further than that from its k-th nearest reference signature is out of distribution; the row's
`ood_score` is the larger of the knn distance and knn's threshold × (colour distance / colour threshold)², so one
score and one threshold still decide.

Structure check (joins `knn`): a blank, dark or washed-out field holds no cells, and features made to ignore a
lab's colour and exposure can put such a field near the training images. The graph also returns the field's
structure (`leukray.colour.structure`: the optical density band-passed at the size of nuclei and cells, its
strongest 2 % less its median; smears ≈ 0.25 and more, an empty field ≈ 0). Its threshold is `structure_margin`
(default 0.5) times the weakest (`1 - colour_in_fraction` quantile) structure among the validation images under
other cameras' and stain batches' colours; below it the image is out of distribution, and the row's `ood_score` is
at least knn's threshold × (structure threshold / structure)² (at most 10 × knn's threshold).

Optics check (joins `knn`): the features are trained to hold an answer through ±20 % of magnification and a
camera's blur, so a field through the wrong objective or out of focus can land as near the training images as a
sharp field from another lab does, and knn's distance alone flags only some. The reference also holds the
training images as such optics make them (`leukray.train.optics_images`: through a ×2 weaker objective, each
image at half size beside three others; a ×2 stronger one; a camera's defocus well past the robustness suite's
blur, a disc of radius 10–14 px at 224 px in linear light, then sensor noise). An image nearer those than the
training images — its knn distance over its distance to the k-th nearest of them above the check's ratio
threshold — is out of distribution. By default knn's own threshold stays the `in_fraction` quantile and the ratio
threshold is the largest ratio among the validation images, so the check only adds flags; `far_fraction` moves
knn's threshold out to that quantile and lowers the ratio threshold until `in_fraction` of the validation images
pass both. The check looks only at images farther from the training images than 90 % of the validation images
(`OPTICS_GATE`). The row's `ood_score` is at least knn's threshold × ratio / ratio threshold. Measured on the
default recipe: docs/results.md.

Shift (`score_medians`, `above_median`): the fit also records the validation images' median score per predicted
class. About half of the images like the training ones lie above it; another camera, lamp or stain moves most images
a little away from the training images long before the guard flags many of them, so the fraction above it over a
day's images (`leukray report drift`'s `shift`) says the images changed when the flag rate cannot yet.

Model outputs: inference backends return one float32 array per batch, (N, K + D): K logits, then D features —
1280 pooled features, 7 colour-signature values and the structure (D = 1287 for packages exported before the
structure check, 1280 before the colour check, 0 before the guard existed). `split_outputs` cuts it; test-time
views average both parts at once.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
from scipy.special import logsumexp, softmax

from . import storage
from .config import StorageOptions, StrictModel

METHODS = ("knn", "energy", "msp")
SIGNATURE_DIM = 7
"""Length of `leukray.colour.signature`: the stain's mean OD direction (3), the darkest pixels' OD direction (3),
their chroma (1). Defined here, where the guard reads it, so scoring needs no torch."""
STATS_DIM = SIGNATURE_DIM + 1
"""Length of the exported graph's third output (`leukray.colour.image_stats`): the signature, then `structure`."""
STRUCTURE_STATISTIC = ("leukray.colour.structure (optical density less its quadratic trend, band-passed: strongest "
                       "2 % less the median, × (background / 80)² under 80 of 255), validation images under other "
                       "labs' colours")
"""What the exported graph's structure value is, as the card records it: `leukray calibrate` re-exports a graph
whose card names another (its thresholds stay valid: on smears the statistics agree to within 2 %; they part on
dark frames and on empty fields with strong vignetting, which the older ones read as structure)."""
REFERENCE_FILE = "ood_reference.npy"
COLOUR_REFERENCE_FILE = "ood_colour_reference.npy"
OPTICS_REFERENCE_FILE = "ood_optics_reference.npy"
OPTICS_GATE = 0.9
"""The optics check looks at images farther from the training images than this fraction of the validation images
(measured on the default recipe: every folder's and setting's flags the same to within 0.7 points; scoring skips
their second knn search)."""
SHIFT_MIN_PER_CLASS = 10
"""A class predicted for fewer validation images than this has no median of its own (`score_medians`)."""
OPTICS_MADE = ("the training images through a ×2 weaker objective (each at half size beside three others), a ×2 "
               "stronger one (centre enlarged ×2) and out of focus (disc of radius 10–14 px at 224 px in linear "
               "light, shot and read noise, JPEG q 85), one copy each (leukray.train.optics_images)")
FEATURE_DESCRIPTION = ("pooled MobileNetV2 features (global average pool of features[-1], 1280-d), mean over the "
                       "package's test-time views, L2-normalised; reference = the training split, float16")
_QUERY_CHUNK = 2048


class OODConfig(StrictModel):
    method: str = "knn"
    """Which score sets `in_distribution`: knn | energy | msp (all three thresholds are fitted and recorded)."""
    k: int = 10
    """knn: the neighbour whose distance is the score (Sun et al.)."""
    in_fraction: float = 0.97
    """The fraction of validation images that must count as in distribution; sets each method's threshold."""
    augmented_copies: int = 0
    """Copies of each training image under the training augmentation added to the knn reference; 0 = the images
    as they are only."""
    degraded_copies: int = 0
    """Copies of each training image under one camera or lab defect each (`leukray.perturb.degraded_copy`: blur, read
    and shot noise, JPEG, pixelation, motion blur, down-scaling, over-exposure, another lab, up to the suite's
    strongest severities) added to the knn reference: a defect the network answers through counts as in distribution.
    The threshold stays on the validation images as they are."""
    reference_colour_copies: int = 1
    """Copies of each training image under another lab's camera and stain batch (`leukray.colour.other_labs`: channel
    gains, exposure, dye amounts) added to the knn reference: colours the network was trained to handle count as in
    distribution. The threshold stays on the validation images as they are."""
    colour_check: bool = True
    """Flag images whose stain colour no lab gives (swapped or inverted channels, grey, another dye): joins knn."""
    colour_in_fraction: float = 0.995
    """The fraction of validation images under other cameras' and stain batches' colours that must pass the colour
    check; sets its threshold."""
    colour_copies: int = 3
    """Copies of each training and validation image under another camera's and stain batch's colours in the colour
    check's reference and threshold fit."""
    structure_check: bool = True
    """Flag fields without stained structure (empty, blank, washed out): joins knn."""
    structure_margin: float = 0.5
    """The structure check's threshold: this fraction of the weakest structure (the `1 - colour_in_fraction`
    quantile) among validation images under other cameras' and stain batches' colours."""
    optics_check: bool = True
    """Flag images nearer the training images seen out of focus or at half or double magnification than the training
    images themselves: joins knn."""
    far_fraction: float | None = None
    """With the optics check: knn's own threshold is this quantile of the validation images' distances (None: at
    `in_fraction`, as without the check), and the optics check's ratio threshold is set so that `in_fraction` of them
    pass both — by default the largest ratio among them, so the check adds flags and keeps every validation image."""

    def model_post_init(self, _: Any) -> None:
        check_method(self.method)
        if self.k < 1:
            raise ValueError(f"ood.k={self.k} must be >= 1")
        if not 0.5 <= self.in_fraction < 1.0:
            raise ValueError(f"ood.in_fraction={self.in_fraction} must be in [0.5, 1)")
        if not 0 <= self.augmented_copies <= 8:
            raise ValueError(f"ood.augmented_copies={self.augmented_copies} must be in [0, 8]")
        if not 0 <= self.degraded_copies <= 8:
            raise ValueError(f"ood.degraded_copies={self.degraded_copies} must be in [0, 8]")
        if not 0 <= self.reference_colour_copies <= 8:
            raise ValueError(f"ood.reference_colour_copies={self.reference_colour_copies} must be in [0, 8]")
        if not 0.5 <= self.colour_in_fraction <= 1.0:
            raise ValueError(f"ood.colour_in_fraction={self.colour_in_fraction} must be in [0.5, 1]")
        if not 0 <= self.colour_copies <= 16:
            raise ValueError(f"ood.colour_copies={self.colour_copies} must be in [0, 16]")
        if not 0 < self.structure_margin <= 1.0:
            raise ValueError(f"ood.structure_margin={self.structure_margin} must be in (0, 1]")
        if self.far_fraction is not None and not self.in_fraction <= self.far_fraction <= 1.0:
            raise ValueError(f"ood.far_fraction={self.far_fraction} must be in [ood.in_fraction={self.in_fraction}, 1]")


def check_method(name: str) -> str:
    if name not in METHODS:
        raise ValueError(f"ood method {name!r} is not one of: {', '.join(METHODS)}")
    return name


def split_outputs(outputs: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray | None]:
    """(N, K + D) model outputs → logits (N, K) and features (N, D), or None when the model gives no features."""
    outputs = np.asarray(outputs)
    logits = outputs[:, :num_classes]
    return logits, (outputs[:, num_classes:] if outputs.shape[1] > num_classes else None)


def l2_normalise(features: np.ndarray) -> np.ndarray:
    f = np.asarray(features, dtype=np.float32)
    return f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)


def knn_scores(features: np.ndarray, reference: np.ndarray, k: int) -> np.ndarray:
    """Euclidean distance of each L2-normalised feature to its k-th nearest reference (normalised) feature."""
    q = l2_normalise(features)
    ref = np.asarray(reference, dtype=np.float32)
    k = min(k, len(ref))
    out = np.empty(len(q), dtype=np.float64)
    for start in range(0, len(q), _QUERY_CHUNK):
        sims = q[start:start + _QUERY_CHUNK] @ ref.T
        kth = -np.partition(-sims, k - 1, axis=1)[:, k - 1]  # k-th largest cosine similarity
        out[start:start + len(sims)] = np.sqrt(np.maximum(2.0 - 2.0 * kth, 0.0))
    return out


def kth_distance(queries: np.ndarray, reference: np.ndarray, k: int) -> np.ndarray:
    """Euclidean distance of each query to its k-th nearest reference point (the colour check: few dimensions,
    no normalisation)."""
    q = np.asarray(queries, dtype=np.float32)
    ref = np.asarray(reference, dtype=np.float32)
    k = min(k, len(ref))
    ref_sq = (ref ** 2).sum(1)
    out = np.empty(len(q), dtype=np.float64)
    for start in range(0, len(q), _QUERY_CHUNK):
        chunk = q[start:start + _QUERY_CHUNK]
        d2 = (chunk ** 2).sum(1)[:, None] - 2.0 * chunk @ ref.T + ref_sq[None, :]
        out[start:start + len(chunk)] = np.sqrt(np.maximum(np.partition(d2, k - 1, axis=1)[:, k - 1], 0.0))
    return out


def energy_scores(logits: np.ndarray, temperature: float) -> np.ndarray:
    return -temperature * logsumexp(np.asarray(logits, np.float64) / temperature, axis=1)


def msp_scores(logits: np.ndarray, temperature: float) -> np.ndarray:
    return 1.0 - softmax(np.asarray(logits, np.float64) / temperature, axis=1).max(axis=1)


@dataclass
class Guard:
    method: str
    k: int
    in_fraction: float
    temperature: float
    thresholds: dict[str, float]
    reference: np.ndarray = field(repr=False)
    """(N, D) float16, L2-normalised training features."""
    fitted: dict[str, Any] = field(default_factory=dict)
    colour_reference: np.ndarray | None = field(default=None, repr=False)
    """(M, 7) float16 colour signatures the colour check accepts; None = no colour check (older packages)."""
    colour_threshold: float | None = None
    structure_threshold: float | None = None
    """An image whose `leukray.colour.structure` is below this is an empty field; None = no structure check."""
    optics_reference: np.ndarray | None = field(default=None, repr=False)
    """(M, D) float16, L2-normalised features of the training images under the wrong optics; None = no optics check."""
    optics_threshold: float | None = None
    """An image whose knn distance over its distance to `optics_reference` exceeds this is out of distribution."""
    optics_gate: float | None = None
    """The optics check looks only at images whose knn distance is above this (`OPTICS_GATE` of the validation
    images'): nearer ones are as typical as most validation images, and scoring skips their second search."""
    _reference32: np.ndarray | None = field(default=None, init=False, repr=False)
    """The reference in float32, converted once for the knn search (not per batch)."""
    _optics32: np.ndarray | None = field(default=None, init=False, repr=False)

    @property
    def threshold(self) -> float:
        return self.thresholds[self.method]

    def scores(self, logits: np.ndarray, features: np.ndarray | None, method: str | None = None) -> np.ndarray:
        """Each image's out-of-distribution score under `method` (default: the package's); higher = further."""
        return np.maximum.reduce(list(self.check_scores(logits, features, method).values()))

    def check_scores(self, logits: np.ndarray, features: np.ndarray | None,
                     method: str | None = None) -> dict[str, np.ndarray]:
        """Each check's score on the method's threshold's scale, by name: the method's own (`knn`, `energy` or
        `msp`), and with knn the `optics` check (knn's threshold × ratio / its threshold) and the `colour` and
        `structure` checks the package has, each knn's threshold × the square of how far past its own threshold the
        image is (colour distance / its threshold; structure threshold / structure, capped at 10 × knn's threshold
        for a field with none at all). The score is their maximum, so an image is flagged by every check whose score
        is over the threshold (`flagged_by`). Why the square: the two checks are fitted to pass 99.5 % of
        in-distribution images against knn's 97 %, so an image they flag is stronger evidence and ranks above the
        in-distribution images knn flags (measured: the blank fields' AUROC above max-softmax's on all three seeds
        of the default recipe, docs/results.md); which images are flagged does not change."""
        method = check_method(method or self.method)
        if method == "energy":
            return {method: energy_scores(logits, self.temperature)}
        if method == "msp":
            return {method: msp_scores(logits, self.temperature)}
        if features is None:
            raise ValueError("the knn guard needs the network's features; this model gives none "
                             "(re-export it: leukray calibrate)")
        if self._reference32 is None:
            self._reference32 = self.reference.astype(np.float32)
        pooled_dim = self.reference.shape[1]
        checks = {"knn": knn_scores(features[:, :pooled_dim], self._reference32, self.k)}
        if self.optics_threshold is not None:  # only past the gate: nearer images are typical whatever else is near
            far = np.flatnonzero(checks["knn"] > (self.optics_gate or 0.0))
            checks["optics"] = np.zeros(len(features))
            if len(far):
                ratio = self.optics_ratio(features[far, :pooled_dim], checks["knn"][far])
                checks["optics"][far] = self.thresholds["knn"] * ratio / self.optics_threshold
        if self.colour_threshold is not None and features.shape[1] > pooled_dim:
            ratio = self.colour_scores(features) / self.colour_threshold
            checks["colour"] = self.thresholds["knn"] * ratio ** 2
        if self.structure_threshold is not None and features.shape[1] > pooled_dim + SIGNATURE_DIM:
            ratio = self.structure_threshold / np.maximum(features[:, pooled_dim + SIGNATURE_DIM], 1e-9)
            checks["structure"] = self.thresholds["knn"] * np.minimum(ratio ** 2, 10.0)
        return checks

    def flagged_by(self, logits: np.ndarray, features: np.ndarray | None) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """The scores under the package's method, and per check (`check_scores`' names) which images it flags:
        which part of the guard objects tells a lab what to look at — `knn` the images themselves, `colour` the
        stain or the camera's channel order, `structure` an empty field. An image is out of distribution when
        any check flags it."""
        checks = self.check_scores(logits, features)
        return np.maximum.reduce(list(checks.values())), {name: s > self.threshold for name, s in checks.items()}

    def optics_ratio(self, pooled: np.ndarray, knn: np.ndarray) -> np.ndarray:
        """knn's distance over the distance to the k-th nearest training image under the wrong optics: above 1 an
        image is nearer those than the training images as they are."""
        if self._optics32 is None:
            self._optics32 = self.optics_reference.astype(np.float32)
        return knn / np.maximum(knn_scores(pooled, self._optics32, self.k), 1e-9)

    def colour_scores(self, features: np.ndarray) -> np.ndarray:
        """Distance of each image's colour signature (the features after the pooled ones) to its k-th nearest
        accepted signature."""
        p = self.reference.shape[1]
        return kth_distance(features[:, p:p + SIGNATURE_DIM], self.colour_reference, self.k)

    def above_median(self, scores: np.ndarray, predicted: np.ndarray) -> np.ndarray | None:
        """`above_median` with the package's validation medians; None for a package fitted before they were
        recorded."""
        medians = self.fitted.get("score_median")
        return None if not medians else above_median(medians, scores, predicted)

    def in_distribution(self, scores: np.ndarray, method: str | None = None) -> np.ndarray:
        return np.asarray(scores) <= self.thresholds[check_method(method or self.method)]

    def card(self) -> dict[str, Any]:
        """What the model card records: method, k, thresholds, how and on what they were fitted."""
        card = {"method": self.method, "k": self.k, "in_fraction": self.in_fraction, "threshold": self.threshold,
                "thresholds": dict(self.thresholds), "temperature": self.temperature,
                "reference": {"file": REFERENCE_FILE, "n": int(len(self.reference)),
                              "dim": int(self.reference.shape[1]), "dtype": "float16"},
                "feature": FEATURE_DESCRIPTION, **self.fitted}
        if self.colour_reference is not None:
            card["colour"] = {**card.get("colour", {}), "threshold": self.colour_threshold, "k": self.k,
                              "reference": {"file": COLOUR_REFERENCE_FILE, "n": int(len(self.colour_reference)),
                                            "dim": int(self.colour_reference.shape[1]), "dtype": "float16"}}
        if self.structure_threshold is not None:
            card["structure"] = {**card.get("structure", {}), "threshold": self.structure_threshold}
        if self.optics_threshold is not None:
            card["optics"] = {**card.get("optics", {}), "threshold": self.optics_threshold, "gate": self.optics_gate,
                              "reference": {"file": OPTICS_REFERENCE_FILE, "n": int(len(self.optics_reference)),
                                            "dim": int(self.optics_reference.shape[1]), "dtype": "float16"}}
        return card


def fit_guard(train_features: np.ndarray, val_logits: np.ndarray, val_features: np.ndarray, temperature: float,
              cfg: OODConfig | None = None, fitted: dict[str, Any] | None = None,
              colour_reference: np.ndarray | None = None, colour_val: np.ndarray | None = None,
              pooled_dim: int = 1280, optics_features: np.ndarray | None = None) -> Guard:
    """Reference = the normalised training features; each method's threshold = the `in_fraction` quantile of its
    validation scores. With `optics_features` (the training images under the wrong optics,
    `leukray.train.optics_images`) and `cfg.optics_check`, the optics check joins knn: knn's threshold moves to the
    `far_fraction` quantile and the ratio threshold takes the validation images that knn no longer flags, down to
    `in_fraction` passing both. With `colour_reference` and `colour_val` (`leukray.colour.signature_envelope` of the
    training and validation images) and `cfg.colour_check`, the colour check joins knn, its threshold the
    `colour_in_fraction` quantile of `colour_val`'s distances. `fitted` (split names, counts, tta) goes into the
    card as it is."""
    cfg = cfg or OODConfig()
    if len(train_features) == 0 or len(val_logits) == 0:
        raise ValueError("the out-of-distribution guard needs training features and validation images")
    reference = l2_normalise(np.asarray(train_features)[:, :pooled_dim]).astype(np.float16)
    colour_val = None if colour_val is None else np.asarray(colour_val)
    guard = Guard(cfg.method, cfg.k, cfg.in_fraction, float(temperature), {}, reference, dict(fitted or {}))
    val_scores = {method: guard.scores(val_logits, val_features, method) for method in METHODS}
    for method, s in val_scores.items():
        guard.thresholds[method] = float(np.quantile(s, cfg.in_fraction, method="higher"))
    if cfg.optics_check and optics_features is not None and len(optics_features):
        fit_optics(guard, l2_normalise(np.asarray(optics_features)[:, :pooled_dim]).astype(np.float16),
                   np.asarray(val_features)[:, :pooled_dim], val_scores["knn"], cfg)
    if cfg.colour_check and colour_reference is not None and colour_val is not None and len(colour_val):
        guard.colour_reference = np.asarray(colour_reference, dtype=np.float16)[:, :SIGNATURE_DIM]
        d = kth_distance(colour_val[:, :SIGNATURE_DIM], guard.colour_reference, guard.k)
        guard.colour_threshold = float(np.quantile(d, cfg.colour_in_fraction, method="higher"))
        guard.fitted["colour"] = {"in_fraction": cfg.colour_in_fraction, "copies": cfg.colour_copies,
                                  "n_val": int(len(colour_val)),
                                  "envelope": "leukray.colour.signature_envelope (colour_response: channel gains, "
                                              "exposure, dye amounts)"}
    if cfg.structure_check and colour_val is not None and colour_val.shape[1] > SIGNATURE_DIM:
        weakest = np.quantile(colour_val[:, SIGNATURE_DIM], 1.0 - cfg.colour_in_fraction, method="lower")
        guard.structure_threshold = float(cfg.structure_margin * weakest)
        guard.fitted["structure"] = {"margin": cfg.structure_margin, "quantile": 1.0 - cfg.colour_in_fraction,
                                     "weakest": float(weakest), "n_val": int(len(colour_val)),
                                     "statistic": STRUCTURE_STATISTIC}
    guard.fitted.setdefault("n_val", int(len(val_logits)))
    final = guard.scores(val_logits, val_features)
    guard.fitted["val_flagged_fraction"] = float((~guard.in_distribution(final)).mean())
    guard.fitted["score_median"] = score_medians(final, np.asarray(val_logits).argmax(1), np.shape(val_logits)[1])
    return guard


def score_medians(scores: np.ndarray, predicted: np.ndarray, num_classes: int) -> dict[str, Any]:
    """The validation images' median `ood_score`, over all and per predicted class (in the card's class order; None
    for a class predicted fewer than `SHIFT_MIN_PER_CLASS` times, which then uses the overall one). Per class because
    the distances differ by class (measured on the default recipe: Benign fields lie about twice as far from their
    nearest training images as Pre-B ones), so a day of mostly Benign smears is not mistaken for a shift."""
    scores, predicted = np.asarray(scores, dtype=np.float64), np.asarray(predicted)
    by_class = [float(np.median(scores[predicted == c])) if (predicted == c).sum() >= SHIFT_MIN_PER_CLASS else None
                for c in range(num_classes)]
    return {"all": float(np.median(scores)), "by_class": by_class, "n_val": int(len(scores)),
            "min_per_class": SHIFT_MIN_PER_CLASS}


def above_median(medians: dict[str, Any], scores: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """Which images lie farther from the training images than the median validation image of their predicted
    class (`score_medians`): about half of in-distribution images, by construction. Another camera, lamp or stain
    moves most images away from the training images long before the guard flags many of them, so this fraction
    over a day's images (`leukray report drift`'s `shift`) says the images changed when the flag rate cannot yet."""
    m = np.array([medians["all"] if v is None else v for v in medians["by_class"]], dtype=np.float64)
    return np.asarray(scores) > m[np.asarray(predicted)]


def fit_optics(guard: Guard, optics_reference: np.ndarray, val_pooled: np.ndarray, knn: np.ndarray,
               cfg: OODConfig) -> None:
    """The optics check's thresholds on the validation images (pooled features `val_pooled`, knn distances `knn`):
    knn's at the `far_fraction` quantile of their distances; the ratio's so that as many validation images as knn
    flagged alone at `in_fraction` are flagged by the two together (the larger ratios among those knn's new threshold
    lets pass); the gate at their `OPTICS_GATE` quantile, below which the check does not look (so at most that many
    are flagged)."""
    allowed = int((knn > guard.thresholds["knn"]).sum())  # what knn alone flags at in_fraction
    far_fraction = cfg.in_fraction if cfg.far_fraction is None else cfg.far_fraction
    far = float(np.quantile(knn, far_fraction, method="higher"))
    guard.optics_reference = optics_reference
    ratio = np.sort(guard.optics_ratio(val_pooled, knn)[knn <= far])[::-1]
    guard.optics_gate = float(np.quantile(knn, OPTICS_GATE))
    room = allowed - int((knn > far).sum())
    guard.thresholds["knn"] = far
    # ratio is never empty (far is a quantile of knn); a floor keeps the score finite when the validation images
    # duplicate training images (knn distance 0)
    guard.optics_threshold = max(float(ratio[min(max(room, 0), len(ratio) - 1)]), 1e-6)
    guard.fitted["optics"] = {"far_fraction": far_fraction, "gate_fraction": OPTICS_GATE, "made": OPTICS_MADE,
                              "n_val": int(len(knn))}


def widen_guard(guard: Guard, features: np.ndarray, temperature: float, fitted: dict[str, Any],
                logits: np.ndarray | None = None) -> Guard:
    """The package's guard with a lab's own labelled images added to its references (their pooled features to
    knn's, their colour signatures to the colour check's) and every threshold kept: what the package's validation
    split set. Why not refit the thresholds on the lab's images: a sample from a lab whose camera differs sits far
    from the training images, and thresholds set at its quantiles move so far out that blank fields, other stains
    and photographs pass (measured: docs/results.md); added to the references, the lab's images count as in
    distribution and everything far from both stays flagged. The medians the drift report's shift compares with
    (`score_median`) are refitted on the lab's images, each scored against the widened references without itself
    (`logits`: the images' logits, for their predicted classes): what is typical of that lab's images from now on.
    Without `logits` they are dropped, since the package's validation medians would call every day of that lab's
    images a shift."""
    pooled = guard.reference.shape[1]
    f = np.asarray(features, dtype=np.float32)
    kept = {k: v for k, v in guard.fitted.items() if k != "score_median"}
    widened = Guard(guard.method, guard.k, guard.in_fraction, float(temperature), dict(guard.thresholds),
                    np.concatenate([guard.reference, l2_normalise(f[:, :pooled]).astype(np.float16)]),
                    {**kept, **fitted}, guard.colour_reference, guard.colour_threshold,
                    guard.structure_threshold, guard.optics_reference, guard.optics_threshold, guard.optics_gate)
    if guard.colour_reference is not None and f.shape[1] >= pooled + SIGNATURE_DIM:
        widened.colour_reference = np.concatenate([guard.colour_reference,
                                                   f[:, pooled:pooled + SIGNATURE_DIM].astype(np.float16)])
    if logits is not None and len(f):
        # each image is its own nearest entry in the widened references: one neighbour more leaves it out (the
        # optics check's reference holds no lab images, so its ratio shifts a little, only past the gate: the
        # medians lie far below it)
        without_self = replace(widened, k=widened.k + 1)
        medians = score_medians(without_self.scores(logits, f), np.asarray(logits).argmax(1), np.shape(logits)[1])
        widened.fitted["score_median"] = {**medians, "fitted_on": "the lab's sample, each image without itself"}
    return widened


def save_reference(guard: Guard, local_dir: str) -> None:
    import os

    np.save(os.path.join(local_dir, REFERENCE_FILE), guard.reference)
    if guard.colour_reference is not None:
        np.save(os.path.join(local_dir, COLOUR_REFERENCE_FILE), guard.colour_reference)
    if guard.optics_reference is not None:
        np.save(os.path.join(local_dir, OPTICS_REFERENCE_FILE), guard.optics_reference)


def structure_outdated(card: dict[str, Any]) -> bool:
    """Whether the package's graph computes an older structure value than `STRUCTURE_STATISTIC`."""
    return ((card.get("ood") or {}).get("structure") or {}).get("statistic", STRUCTURE_STATISTIC) != STRUCTURE_STATISTIC


def guard_notes(card: dict[str, Any], package_uri: str) -> list[str]:
    """What a scoring run says about a package's guard before it starts: none at all, or a graph whose structure
    check predates today's (both mended by `leukray calibrate`, without retraining)."""
    if not card.get("ood"):
        return [f"warning: {package_uri} has no out-of-distribution guard: ood_score and in_distribution stay empty "
                f"and only low confidence sets needs_review (add one without retraining: leukray calibrate)"]
    if structure_outdated(card):
        return [f"note: {package_uri}'s structure check is older than this version's: dark frames and empty fields "
                f"with strong vignetting are left to the knn distance (update its graph without retraining: leukray "
                f"calibrate)"]
    return []


def load_guard(package_uri: str, card: dict[str, Any], opts: StorageOptions | None = None) -> Guard | None:
    """The package's guard, or None for a package fitted before the guard existed."""
    spec = card.get("ood")
    if not spec:
        return None
    ref_uri = storage.join(package_uri, spec["reference"]["file"])
    reference = np.load(io.BytesIO(storage.read_bytes(ref_uri, opts)), allow_pickle=False)
    fitted = {k: v for k, v in spec.items() if k not in
              ("method", "k", "in_fraction", "threshold", "thresholds", "temperature", "reference", "feature")}
    guard = Guard(spec["method"], int(spec["k"]), float(spec["in_fraction"]), float(spec["temperature"]),
                  {k: float(v) for k, v in spec["thresholds"].items()}, reference, fitted)
    colour = spec.get("colour") or {}
    if colour.get("reference"):
        colour_uri = storage.join(package_uri, colour["reference"]["file"])
        guard.colour_reference = np.load(io.BytesIO(storage.read_bytes(colour_uri, opts)), allow_pickle=False)
        guard.colour_threshold = float(colour["threshold"])
        guard.fitted["colour"] = {k: v for k, v in colour.items() if k not in ("reference", "threshold", "k")}
    if (spec.get("structure") or {}).get("threshold") is not None:
        guard.structure_threshold = float(spec["structure"]["threshold"])
        guard.fitted["structure"] = {k: v for k, v in spec["structure"].items() if k != "threshold"}
    optics = spec.get("optics") or {}
    if optics.get("reference"):
        optics_uri = storage.join(package_uri, optics["reference"]["file"])
        guard.optics_reference = np.load(io.BytesIO(storage.read_bytes(optics_uri, opts)), allow_pickle=False)
        guard.optics_threshold = float(optics["threshold"])
        guard.optics_gate = None if optics.get("gate") is None else float(optics["gate"])
        guard.fitted["optics"] = {k: v for k, v in optics.items() if k not in ("reference", "threshold", "gate")}
    return guard


DEFAULT_BENIGN_MALIGNANT_THRESHOLD = 0.9
"""A row is also low confidence when the calibrated probability of its side of benign vs malignant is below this."""


def low_confidence(probs: np.ndarray, classes: list[str], threshold: float,
                   benign_malignant_threshold: float = 0.0) -> np.ndarray:
    """Rows the classifier is unsure of: calibrated confidence below `threshold`, or the calibrated probability of
    the predicted side of benign vs malignant (P(benign), or 1 - P(benign) when a malignant class is predicted)
    below `benign_malignant_threshold`. Why the second rule: a benign cell called malignant or the reverse is the
    error a lab cannot take silently, while Pre-B vs Pro-B doubt matters less; on the validation split, stain
    batches turned one malignant cell into a "Benign" at confidence 0.86-0.90 with 10-14 % on the malignant
    classes, above the plain threshold (docs/results.md). A package without a "Benign" class: the first rule alone."""
    probs = np.asarray(probs, dtype=np.float64)
    low = probs.max(axis=1) < threshold
    if "Benign" in classes and benign_malignant_threshold > 0:
        pb = probs[:, list(classes).index("Benign")]
        low |= np.maximum(pb, 1.0 - pb) < benign_malignant_threshold
    return low


def check_names(flagged_by: dict[str, np.ndarray]) -> list[str | None]:
    """Per image, the checks that flag it (`Guard.flagged_by`), comma-separated in the guard's order; None when
    none does: the results' `ood_check`."""
    names = list(flagged_by)
    rows = np.stack([flagged_by[n] for n in names], 1) if names else np.zeros((0, 0), bool)
    return [",".join(n for n, o in zip(names, row) if o) or None for row in rows]


def review_reason(low_confidence: np.ndarray, out_of_distribution: np.ndarray | None) -> list[str | None]:
    """Per row: `low_confidence`, `out_of_distribution`, `low_confidence,out_of_distribution` or None."""
    ood = np.zeros(len(low_confidence), bool) if out_of_distribution is None else np.asarray(out_of_distribution)
    names = {(True, False): "low_confidence", (False, True): "out_of_distribution",
             (True, True): "low_confidence,out_of_distribution", (False, False): None}
    return [names[(bool(a), bool(b))] for a, b in zip(low_confidence, ood)]


def auroc(in_scores: np.ndarray, out_scores: np.ndarray) -> float:
    """Area under the ROC curve for telling out- from in-distribution by score (1 = perfect, 0.5 = chance)."""
    from sklearn.metrics import roc_auc_score

    y = np.r_[np.zeros(len(in_scores)), np.ones(len(out_scores))]
    return float(roc_auc_score(y, np.r_[in_scores, out_scores]))
