"""Drift of the predicted class mix: each day's predictions against the training distribution on the model card.

`Results.drift()` and `leukray report drift` call `drift`; the statistics are total variation distance and a
Pearson chi-square goodness of fit (scipy) per day, plus the out-of-distribution guard's flag rate. Model cards
are read through the registry (`registry.read_card`: a package folder, or a model folder's version or LATEST).
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import re
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import pyarrow as pa

from . import CLASSES, registry, storage
from .config import StorageOptions
from .query import RESULTS_VIEW, QueryError, check_date, date_where
from .report import OOD_CHECK_MEANING, OOD_CHECKS, sort_classes

if TYPE_CHECKING:
    from .query import Results


def drift(results: Results, since: str | _dt.date | None = None, until: str | _dt.date | None = None,
          model: str | None = None, plot: str | None = None, group_by: str | None = None) -> pa.Table:
    """Class mix per day (ok rows) against the training distribution (model card "class_counts").

    `model`: a package or model folder URI used for every day; by default each run's recorded "model_uri"
    (with the run's model_version) is used, so a day scored by two models gives one row per model.
    Rows with `source="training"` hold the training proportions (one per model card); rows with
    `source="scored"` one day each, with `tv_distance` (total variation, 0..1), `chi2` and `p_value`
    (chi-square goodness of fit of the day's counts to the training proportions; df = classes - 1), and
    `ood_rate`: the fraction of the day's rows the out-of-distribution guard flagged (training rows: the
    validation split's, by construction about 1 - in_fraction; null where the model has no guard). A rising
    rate says the images changed: another camera, stain, or something that is not a smear; `ood_p_value` (one-sided
    binomial test against the rate the guard flags in distribution) says when a day's rate is more than chance.
    `shift`: the fraction of the day's rows whose `ood_score` is above the median validation image's of their
    predicted class (card "ood.score_median"; training rows 0.5, by construction), with `shift_p_value` (one-sided
    sign test): another camera, lamp or stain moves most images away from the training images before the guard
    flags many of them (measured: red gain ×1.2 moves about two thirds above the median while 4 % are flagged), so
    the shift says the images changed on a day of a hundred or two where `ood_rate` needs thousands (null for models
    without the medians: packages fitted before they were recorded). Fields of one smear are not independent: with
    `group_by`, a regular expression whose first group takes the slide (or patient) out of a row's path (a path it
    does not match is a group of its own), `shift_p_value` is the sign test over the day's groups instead — a group
    counts as above when most of its rows are — and `shift_groups` says how many took part.
    `ood_knn_rate`, `ood_optics_rate`, `ood_colour_rate`, `ood_structure_rate`: the fraction each of the guard's
    checks flagged (`ood_check`; a row can count in several), which says what changed — the images themselves, the
    microscope's focus or magnification, their colours, or fields without cells (null for days with rows scored
    before `ood_check` was recorded).
    """
    since, until = check_date(since, "since"), check_date(until, "until")
    if group_by is not None:
        check_group_by(group_by)
    where, params = date_where(since, until)
    counts = results.sql(
        f"SELECT run_id, run_date, predicted_class, count(*) AS n, "
        f"count(in_distribution) AS guarded, count(*) FILTER (WHERE NOT in_distribution) AS ood, "
        f"count(*) FILTER (WHERE NOT in_distribution AND ood_check IS NULL) AS ood_unnamed, "
        + ", ".join(f"count(*) FILTER (WHERE list_contains(string_split(ood_check, ','), '{c}')) AS ood_{c}"
                    for c in OOD_CHECKS) + " "
        f"FROM {RESULTS_VIEW} WHERE status = 'ok' AND predicted_class IS NOT NULL AND {where} GROUP BY ALL",
        params,
    ).to_pylist()

    cards: dict[tuple[str, str | None], dict[str, Any]] = {}

    def card_for(key: tuple[str, str | None]) -> dict[str, Any]:
        if key not in cards:
            cards[key] = load_model_card(key[0], results.storage, key[1])
        return cards[key]

    by_run = {r.run_id: r for r in results.runs}
    run_card: dict[str, tuple[str, str | None]] = {}
    for row in counts:
        rid = row["run_id"]
        if rid in run_card:
            continue
        if model:
            key = (model, None)
        else:
            run = by_run.get(rid)
            if run is None or not run.model_uri:
                raise QueryError(f"cannot find the model card for run {rid}: its record in the table history "
                                 f"has no 'model_uri'; pass --model <package or model folder URI>")
            key = (run.model_uri, run.model_version)
        card_for(key)
        run_card[rid] = key

    # the shift: each day's rows farther from the training images than the median validation image of their
    # predicted class (the card's ood.score_median), about half in distribution; per (day, card) and group
    # ({slide: [above, compared]} with group_by, else one group)
    grouped: dict[tuple[str, tuple[str, str | None]], dict[str, list[int]]] = {}
    medians = [(rid, cls, m) for rid, key in run_card.items() for cls, m in class_medians(card_for(key)).items()]
    if medians:
        values = ", ".join(["(?, ?, ?)"] * len(medians))
        group = "CASE WHEN regexp_matches(path, ?) THEN regexp_extract(path, ?, 1) ELSE path END" if group_by else "''"
        above = results.sql(
            f"WITH med(run_id, predicted_class, median) AS (VALUES {values}) "
            f"SELECT run_id, run_date, {group} AS grp, count(*) FILTER (WHERE ood_score > median) AS above, "
            f"count(ood_score) AS compared FROM {RESULTS_VIEW} JOIN med USING (run_id, predicted_class) "
            f"WHERE status = 'ok' AND {where} GROUP BY ALL",
            [x for m in medians for x in m] + ([group_by] * 2 if group_by else []) + params,
        ).to_pylist()
        for row in above:
            g = grouped.setdefault((row["run_date"], run_card[row["run_id"]]), {}).setdefault(row["grp"], [0, 0])
            g[0] += int(row["above"])
            g[1] += int(row["compared"])

    # observed counts per (day, card)
    observed: dict[tuple[str, tuple[str, str | None]], dict[str, int]] = {}
    guarded: dict[tuple[str, tuple[str, str | None]], list[int]] = {}
    for row in counts:
        k = (row["run_date"], run_card[row["run_id"]])
        observed.setdefault(k, {})
        observed[k][row["predicted_class"]] = observed[k].get(row["predicted_class"], 0) + int(row["n"])
        g = guarded.setdefault(k, {"guarded": 0, "ood": 0, "ood_unnamed": 0, **{f"ood_{c}": 0 for c in OOD_CHECKS}})
        for name in g:
            g[name] += int(row[name])

    if not cards and model:
        card_for((model, None))
    all_classes: list[str] = []
    for card in cards.values():
        all_classes += list(card["_training"].keys())
    for obs in observed.values():
        all_classes += list(obs.keys())
    classes = list(OrderedDict.fromkeys(all_classes)) or list(CLASSES)
    ordered = sort_classes(classes)
    if all(c in CLASSES for c in classes):
        classes = ordered

    rows: list[dict[str, Any]] = []
    for key, card in sorted(cards.items(), key=lambda kv: (str(kv[1].get("name")), str(kv[1].get("version")))):
        train = card["_training"]
        total = sum(train.values())
        row = {"source": "training", "run_date": None, "model": _card_label(card), "n": total}
        row.update({c: (train.get(c, 0) / total if total else None) for c in classes})
        row.update(tv_distance=None, chi2=None, p_value=None, ood_rate=expected_ood_rate(card), ood_p_value=None,
                   shift=0.5 if class_medians(card) else None, shift_p_value=None, shift_groups=None,
                   **{f"ood_{c}_rate": None for c in OOD_CHECKS})
        rows.append(row)
    for (day, key), obs in sorted(observed.items(), key=lambda kv: (kv[0][0], _card_label(card_for(kv[0][1])))):
        card = card_for(key)
        train = card["_training"]
        n = sum(obs.values())
        total = sum(train.values())
        p = {c: obs.get(c, 0) / n for c in classes}
        q = {c: train.get(c, 0) / total for c in classes}
        tv = 0.5 * sum(abs(p[c] - q[c]) for c in classes)
        chi2, pval = chi_square([obs.get(c, 0) for c in classes], [q[c] for c in classes])
        row = {"source": "scored", "run_date": day, "model": _card_label(card), "n": n}
        row.update(p)
        g = guarded[(day, key)]
        named = g["guarded"] and not g["ood_unnamed"]  # rows scored before ood_check existed: not split up
        row.update(tv_distance=tv, chi2=chi2, p_value=pval,
                   ood_rate=g["ood"] / g["guarded"] if g["guarded"] else None,
                   ood_p_value=ood_excess(g["ood"], g["guarded"], expected_ood_rate(card)),
                   **shift_test(list(grouped.get((day, key), {}).values()), by_group=group_by is not None),
                   **{f"ood_{c}_rate": g[f"ood_{c}"] / g["guarded"] if named else None for c in OOD_CHECKS})
        rows.append(row)
    schema = pa.schema(
        [("source", pa.string()), ("run_date", pa.string()), ("model", pa.string()), ("n", pa.int64())]
        + [(c, pa.float64()) for c in classes]
        + [("tv_distance", pa.float64()), ("chi2", pa.float64()), ("p_value", pa.float64()),
           ("ood_rate", pa.float64()), ("ood_p_value", pa.float64()),
           ("shift", pa.float64()), ("shift_p_value", pa.float64()), ("shift_groups", pa.int64())]
        + [(f"ood_{c}_rate", pa.float64()) for c in OOD_CHECKS]
    )
    table = pa.Table.from_pylist(rows, schema=schema)
    if plot:
        from .plots import plot_class_mix

        if not rows:
            raise QueryError("nothing to plot: no scored days in the selected range")
        plot_class_mix(table, plot, results.storage)
    return table


ALERT_ALPHA = 0.001
"""`alerts`' significance level: a day is named when its test's p-value is below it."""
ALERT_MIN_SHIFT = 0.6
"""`alerts`' least `shift` worth naming: fields of one smear are not independent, so a large archive's p-value can
be small for a shift no one would act on (0.5 in distribution; a red gain ×1.2 gives about 0.68)."""


def alerts(table: pa.Table, alpha: float = ALERT_ALPHA, min_shift: float = ALERT_MIN_SHIFT,
           max_tv: float | None = None) -> list[str]:
    """One line per scored day of a `drift` table and sign that its images are not like the model's training
    images, for a nightly monitor: more rows out of distribution than the guard flags on its validation images
    (`ood_p_value` < `alpha`, with the check that flagged most), most rows farther from the training images than
    usual (`shift_p_value` < `alpha` and `shift` > `min_shift`: another camera, lamp or stain, before the guard
    flags many) and, with `max_tv`, a class mix unlike the training split's (`tv_distance` > `max_tv` and
    `p_value` < `alpha`; off by default, since a day's patients set its mix)."""
    if not 0 < alpha < 1:
        raise ValueError(f"alpha must be between 0 and 1, got {alpha}")
    rows = table.to_pylist()
    expected = {r["model"]: r["ood_rate"] for r in rows if r["source"] == "training"}
    out = []
    for r in rows:
        if r["source"] != "scored":
            continue
        day = f"{r['run_date']} {r['model']} ({r['n']} images)"
        if r["ood_p_value"] is not None and r["ood_p_value"] < alpha:
            rates = {c: r.get(f"ood_{c}_rate") for c in OOD_CHECKS if r.get(f"ood_{c}_rate")}
            top = max(rates, key=rates.get) if rates else None
            why = (f"; most by {top} ({OOD_CHECK_MEANING[top]}): leukray report review --reason {top} "
                   f"--since {r['run_date']} --until {r['run_date']}" if top else "")
            out.append(f"{day}: {100 * r['ood_rate']:.1f} % out of distribution where the guard flags "
                       f"{100 * (expected.get(r['model']) or 0):.1f} % of its validation images "
                       f"(p = {r['ood_p_value']:.2g}){why}")
        if r["shift_p_value"] is not None and r["shift_p_value"] < alpha and r["shift"] > min_shift:
            over = "" if r.get("shift_groups") is None else f" over {r['shift_groups']} groups"
            out.append(f"{day}: {100 * r['shift']:.0f} % of the images lie farther from the training images than "
                       f"the median validation image of their class (50 % expected, "
                       f"p = {r['shift_p_value']:.2g}{over}): another camera, lamp or stain? Check labelled images "
                       f"of the day with leukray evaluate")
        if max_tv is not None and r["p_value"] is not None and r["tv_distance"] > max_tv and r["p_value"] < alpha:
            out.append(f"{day}: class mix {r['tv_distance']:.2f} from the training split's in total variation "
                       f"(p = {r['p_value']:.2g})")
    return out


def expected_ood_rate(card: dict[str, Any]) -> float | None:
    """The fraction of in-distribution images the model's guard flags: its validation split's (recorded at fit
    time), else 1 - in_fraction; None for a model without a guard."""
    ood = card.get("ood") or {}
    if ood.get("val_flagged_fraction") is not None:
        return float(ood["val_flagged_fraction"])
    return 1.0 - float(ood["in_fraction"]) if ood.get("in_fraction") is not None else None


def ood_excess(flagged: int, guarded: int, expected: float | None) -> float | None:
    """One-sided binomial test (scipy): the probability of flagging at least `flagged` of `guarded` in-distribution
    images at the guard's own rate. Small = more out-of-distribution images than chance gives: the images changed."""
    if not guarded or expected is None:
        return None
    from scipy.stats import binomtest

    return float(binomtest(int(flagged), int(guarded), min(max(expected, 1e-6), 1.0), alternative="greater").pvalue)


def class_medians(card: dict[str, Any]) -> dict[str, float]:
    """{class: the validation split's median ood_score of images predicted as it} from the card's guard
    (`leukray.ood.score_medians`; a class without its own takes the overall median); {} for a model without them."""
    m = (card.get("ood") or {}).get("score_median")
    if not m:
        return {}
    classes = card.get("classes") or list(card.get("_training") or {})
    by_class = list(m.get("by_class") or [])
    return {c: float(by_class[i] if i < len(by_class) and by_class[i] is not None else m["all"])
            for i, c in enumerate(classes)}


def shift_test(groups: list[list[int]], by_group: bool = False) -> dict[str, float | int | None]:
    """`shift`: the fraction of a day's rows above their class's validation median (0.5 in distribution), from
    `groups` ([above, compared] per group); `shift_p_value`: one-sided sign test (scipy binomial, p = 0.5), small =
    the day's images lie farther from the training images than the validation images did. Rows scored together are
    not independent (fields of the same smears): `by_group` counts groups (slides) instead — above when more than
    half of its rows are, below when fewer, left out at exactly half — and `shift_groups` says how many there were."""
    above, compared = sum(a for a, _ in groups), sum(c for _, c in groups)
    if not compared:
        return {"shift": None, "shift_p_value": None, "shift_groups": None}
    from scipy.stats import binomtest

    if by_group:
        k = sum(2 * a > c for a, c in groups)
        n = k + sum(2 * a < c for a, c in groups)
    else:
        k, n = above, compared
    return {"shift": above / compared, "shift_groups": len(groups) if by_group else None,
            "shift_p_value": float(binomtest(k, n, 0.5, alternative="greater").pvalue) if n else 1.0}


def check_group_by(pattern: str) -> str:
    """A `group_by` expression with exactly one group (Python's `re` checks it; DuckDB's RE2 runs it)."""
    try:
        groups = re.compile(pattern).groups
    except re.error as err:
        raise QueryError(f"--group-by {pattern!r} is not a regular expression: {err}") from None
    if groups != 1:
        raise QueryError(f"--group-by {pattern!r} must have exactly one group (…) that takes the slide out of a "
                         f"path, e.g. '/([^/]+)/[^/]+$' for the folder of each file; it has {groups}")
    return pattern


def _card_label(card: dict[str, Any]) -> str:
    return f"{card.get('name', '?')}:{card.get('version', '?')}"


def chi_square(observed: list[int], expected_props: list[float]) -> tuple[float, float]:
    """Pearson chi-square goodness of fit of counts to proportions. A class the model never saw in training
    (expected 0) but observed gives chi2=inf, p=0; classes expected 0 and observed 0 are left out of df."""
    from scipy.stats import chi2 as chi2_dist

    n = sum(observed)
    stat, k = 0.0, 0
    for o, q in zip(observed, expected_props):
        e = n * q
        if e > 0:
            stat += (o - e) ** 2 / e
            k += 1
        elif o > 0:
            return math.inf, 0.0
    if k < 2:
        return stat, 1.0
    return float(stat), float(chi2_dist.sf(stat, k - 1))


def load_model_card(model_uri: str, options: StorageOptions | None = None,
                    version: str | None = None) -> dict[str, Any]:
    """The model card of a package folder, or of `<model folder>/<version or LATEST>/`, with "_training":
    {class: count} (from "class_counts", ordered as "classes") and "_uri" (the package it came from)."""
    try:
        uri, card = registry.read_card(model_uri, options, version)
    except registry.RegistryError as err:
        raise QueryError(f"no model card found for {model_uri.rstrip('/')}: {err}") from None
    except storage.StorageError as err:
        raise QueryError(f"cannot read the model card of {model_uri}: {err}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise QueryError(f"model card {storage.join(model_uri, registry.CARD)} is not valid JSON: {err}") from None
    where = storage.join(uri, registry.CARD)
    counts = card.get("class_counts")
    if not isinstance(counts, dict) or not counts:
        raise QueryError(f"model card {where} has no 'class_counts' (the training class distribution)")
    classes = card.get("classes") or list(counts)
    training = OrderedDict((c, int(counts.get(c, 0))) for c in classes)
    for c, v in counts.items():
        training.setdefault(c, int(v))
    if sum(training.values()) <= 0:
        raise QueryError(f"model card {where} has all-zero 'class_counts'")
    card["_training"] = training
    card["_uri"] = where
    return card
