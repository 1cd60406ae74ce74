"""The review loop end to end: images on a moto S3 server scored on a local Ray cluster (`leukray score`) with a tiny
trained package, a review page built from the results (leukray/review.py), driven in headless Chromium through
Selenium (keys, reload, export), the exported decisions imported into the `reviews` table (leukray/reviews.py), the
`results` view and reports reading them back, and the reviewed images exported as a labelled folder. Import errors
(unknown files, malformed CSV) are checked to write nothing."""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from localcluster import REPO, job_env, local_cluster, make_bucket  # noqa: E402

from leukray import CLASSES, cli, registry, results, storage  # noqa: E402
from leukray.config import StorageOptions  # noqa: E402
from leukray.data import list_labelled_folder  # noqa: E402
from leukray.query import Results  # noqa: E402
from leukray.review import build_page, export_labelled  # noqa: E402
from leukray.reviews import CSV_COLUMNS, NOT_ASSESSABLE, ReviewError, import_decisions, read_reviews  # noqa: E402
from leukray.synth import make_dataset  # noqa: E402

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
OUTPUT = "s3://scores/out"


@pytest.fixture(scope="module")
def scored(tmp_path_factory, tiny_package):
    """A results table on S3 scored by `leukray score` with a registry package; every row flagged (threshold 1)."""
    tmp = tmp_path_factory.mktemp("review")
    with local_cluster(tmp / "cluster", num_cpus=2, s3=True) as info:
        endpoint = info["s3_endpoint"]
        for bucket in ("archive", "models", "scores"):
            make_bucket(endpoint, bucket)
        env = job_env(info, {"RAY_ADDRESS": info["ray_address"]})
        opts = StorageOptions(endpoint_url=endpoint, key="testing", secret="testing")
        make_dataset(tmp / "archive", per_class=3, size=48, seed=3)
        storage.upload_dir(str(tmp / "archive"), "s3://archive/smears", opts)
        registry.publish(str(tiny_package / "pkg"), "s3://models", "leukray-test", opts)
        r = subprocess.run([sys.executable, "-m", "leukray.cli", "score", "--input", "s3://archive/smears",
                            "--output", OUTPUT, "--model", "s3://models/leukray-test", "--set", "review_threshold=1.0",
                            "--set", "batch_size=8", "--set", f"storage.endpoint_url={endpoint}",
                            "--set", "storage.key=testing", "--set", "storage.secret=testing"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-4000:]
        yield {"tmp": tmp, "opts": opts, "env": env, "endpoint": endpoint}


def _decisions_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, CSV_COLUMNS)
        w.writeheader()
        w.writerows(rows)
    return path


def _scored_rows(scored) -> list[dict]:
    with Results(OUTPUT, scored["opts"]) as r:
        return r.sql("SELECT path, source_version, model_name, model_version, predicted_class FROM results "
                     "WHERE status = 'ok' ORDER BY path").to_pylist()


def test_import_rejects_unknown_files_and_malformed_csv(scored):
    tmp, opts = scored["tmp"], scored["opts"]
    rows = _scored_rows(scored)
    good = dict(rows[0], reviewed_class=CLASSES[0], reviewer="dr a", reviewed_at="2026-12-04T09:00:00Z")
    unknown = _decisions_csv(tmp / "unknown.csv", [
        good, dict(good, path="s3://archive/smears/never/seen.jpg"), good,
        dict(good, source_version="not-the-scored-one")])
    with pytest.raises(ReviewError) as err:
        import_decisions(str(unknown), OUTPUT, opts)
    msg = str(err.value)
    assert "line 3: s3://archive/smears/never/seen.jpg was never scored" in msg
    assert "line 5:" in msg and "not-the-scored-one" in msg and "line 2" not in msg and "line 4" not in msg

    bad_class = _decisions_csv(tmp / "bad-class.csv", [good, dict(good, reviewed_class="Blast")])
    with pytest.raises(ReviewError, match=r"bad-class.csv: line 3, column reviewed_class: 'Blast'"):
        import_decisions(str(bad_class), OUTPUT, opts)
    bad_time = _decisions_csv(tmp / "bad-time.csv", [dict(good, reviewed_at="yesterday")])
    with pytest.raises(ReviewError, match=r"line 2, column reviewed_at: 'yesterday'"):
        import_decisions(str(bad_time), OUTPUT, opts)
    (tmp / "no-header.csv").write_text("path,reviewed_class\nx,Benign\n")
    with pytest.raises(ReviewError, match=r"no-header.csv: line 1: the header lacks column\(s\) source_version"):
        import_decisions(str(tmp / "no-header.csv"), OUTPUT, opts)
    (tmp / "ragged.csv").write_text(",".join(CSV_COLUMNS) + "\n" + "a,b,c\n")
    with pytest.raises(ReviewError, match=r"ragged.csv: line 2: 3 fields, the header has 8"):
        import_decisions(str(tmp / "ragged.csv"), OUTPUT, opts)
    assert read_reviews(OUTPUT, opts).num_rows == 0  # nothing written by any of them

    # the CLI says the same, exit code 2
    code = cli.main(["review", "import", str(bad_class), "--output", OUTPUT, "--endpoint-url", scored["endpoint"]])
    assert code == 2


@pytest.mark.skipif(not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)),
                    reason=f"headless Chromium not found ({CHROMIUM}, {CHROMEDRIVER}): "
                           "apt-get install -y chromium chromium-driver (./bootstrap.sh setup does)")
def test_review_page_in_a_browser_and_back(scored, tmp_path, monkeypatch):
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    opts = scored["opts"]
    html = tmp_path / "page"
    built = build_page(OUTPUT, str(html), opts, audit=0)
    expected = _scored_rows(scored)
    assert built["cards"] == len(expected) and built["heatmaps"] == len(expected) and built["unreadable"] == 0
    assert (html / "index.html").is_file() and len(list((html / "images").glob("*-cam.jpg"))) == len(expected)
    page = (html / "index.html").read_text()
    assert "http://" not in page and "https://" not in page  # self-contained: nothing fetched from elsewhere

    downloads = tmp_path / "downloads"
    downloads.mkdir()
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1000",
                f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(arg)
    options.add_experimental_option("prefs", {"download.default_directory": str(downloads),
                                              "download.prompt_for_download": False})
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    try:
        driver.execute_cdp_cmd("Browser.setDownloadBehavior", {"behavior": "allow", "downloadPath": str(downloads)})
        driver.get((html / "index.html").as_uri())
        counter = driver.find_element(By.ID, "counter")
        assert counter.text == f"0 done / {len(expected)} left"
        cards = driver.find_elements(By.CSS_SELECTOR, ".card")
        order = [c.get_attribute("id") for c in cards]  # the page's order: confidence, lowest first
        confidences = {c["id"]: c["confidence"] for c in _page_cards(driver)}
        assert [confidences[int(i.split("-")[1])] for i in order] == sorted(confidences.values())
        # each card says why it is here: the reason, and for an out-of-distribution row the guard's checks
        with Results(OUTPUT, opts) as r:
            why = {x["path"]: x for x in r.sql("SELECT path, review_reason, ood_check FROM results").to_pylist()}
        for c in _page_cards(driver):
            want = why[c["path"]]
            text = driver.find_element(By.CSS_SELECTOR, f"#card-{c['id']} .reason").text
            assert text.startswith(want["review_reason"].replace("_", " ").replace(",", " + ")), text
            assert (f"({want['ood_check'].replace(',', ', ')})" in text) if want["ood_check"] else "(" not in text

        body = driver.find_element(By.TAG_NAME, "body")
        body.send_keys("2")  # no reviewer yet: nothing is recorded, the page asks for a name
        assert "Reviewer" in driver.find_element(By.ID, "notice").text and counter.text.startswith("0 done")
        reviewer = driver.find_element(By.ID, "reviewer")
        reviewer.send_keys("dr test", Keys.ENTER)
        body.send_keys("2")           # card 1 → the second class, advance
        body.send_keys(Keys.ENTER)    # card 2 → the model's class, advance
        body.send_keys("x")           # card 3 → not assessable, advance
        body.send_keys("j", "k")      # move on and back: card 4 stays current
        body.send_keys("h")           # heat map of card 4
        current = driver.find_element(By.CSS_SELECTOR, ".card.current")
        assert current.get_attribute("id") == order[3]
        assert current.find_element(By.TAG_NAME, "img").get_attribute("src").endswith("-cam.jpg")
        assert counter.text == f"3 done / {len(expected) - 3} left"
        shot = tmp_path / "review-page.png"
        driver.save_screenshot(str(shot))
        print(f"\nreview page screenshot: {shot}")
        assert shot.stat().st_size > 10_000

        # Decisions survive a reload (localStorage of this page). Chromium hands a write to its storage
        # service asynchronously, so a reload in the same instant may still see the old state: reload
        # a few times, as a reviewer coming back would, before calling the decisions lost.
        for _ in range(5):
            driver.refresh()
            counter = driver.find_element(By.ID, "counter")
            if counter.text.startswith("3 done"):
                break
            time.sleep(0.5)
        assert counter.text == f"3 done / {len(expected) - 3} left"
        page_cards = {f"card-{c['id']}": c for c in _page_cards(driver)}
        got = [driver.find_element(By.ID, i).get_attribute("data-decision") for i in order[:4]]
        assert got == [CLASSES[1], page_cards[order[1]]["predicted_class"], NOT_ASSESSABLE, ""]

        driver.find_element(By.ID, "export").click()
        deadline = time.time() + 20
        while time.time() < deadline and not [p for p in downloads.glob("*.csv")]:
            time.sleep(0.2)
        exported = list(downloads.glob("*.csv"))
        assert len(exported) == 1, "the page's export did not arrive in the download folder"
    finally:
        driver.quit()

    decisions = list(csv.DictReader(io.StringIO(exported[0].read_text())))
    assert sorted(d["path"] for d in decisions) == sorted(page_cards[i]["path"] for i in order[:3])
    assert {d["reviewer"] for d in decisions} == {"dr test"} and list(decisions[0]) == CSV_COLUMNS
    by_path = {d["path"]: d["reviewed_class"] for d in decisions}

    first = import_decisions(str(exported[0]), OUTPUT, opts)
    again = import_decisions(str(exported[0]), OUTPUT, opts)
    assert (first["added"], again["added"], again["already"]) == (3, 0, 3)
    reviews = read_reviews(OUTPUT, opts)
    assert reviews.num_rows == 3
    assert dict(zip(reviews["path"].to_pylist(), reviews["reviewed_class"].to_pylist())) == by_path

    results.vacuum(OUTPUT, opts, retention_hours=0)  # the results' vacuum leaves the reviews table alone
    assert read_reviews(OUTPUT, opts).num_rows == 3

    with Results(OUTPUT, opts) as r:
        view = r.sql("SELECT path, reviewed_class, reviewed_by, reviewed_at FROM results "
                     "WHERE reviewed_class IS NOT NULL").to_pylist()
        assert {v["path"]: v["reviewed_class"] for v in view} == by_path
        assert {v["reviewed_by"] for v in view} == {"dr test"} and all(v["reviewed_at"] for v in view)
        queue = r.review(limit=None)
        assert queue.num_rows == len(expected) - 3 and not set(queue["path"].to_pylist()) & set(by_path)
        assert r.review(limit=None, include_reviewed=True).num_rows == len(expected)

    # reports through the CLI: the queue without reviewed rows unless --all, the agreement per class
    for k, v in scored["env"].items():
        if k.startswith("AWS_"):
            monkeypatch.setenv(k, v)
    args = ["--output", OUTPUT, "--endpoint-url", scored["endpoint"], "--format", "csv"]
    out = io.StringIO()
    from leukray.query_cli import build_parser

    ns = build_parser().parse_args(["report", "review", "--limit", "0"] + args)
    assert ns.func(ns, out) == 0 and len(out.getvalue().strip().splitlines()) == 1 + len(expected) - 3
    out = io.StringIO()
    ns = build_parser().parse_args(["report", "review", "--limit", "0", "--all"] + args)
    assert ns.func(ns, out) == 0 and len(out.getvalue().strip().splitlines()) == 1 + len(expected)
    out = io.StringIO()
    ns = build_parser().parse_args(["report", "summary", "--by", "class"] + args)
    assert ns.func(ns, out) == 0
    agree = {row["predicted_class"]: row for row in csv.DictReader(io.StringIO(out.getvalue()))}
    assert agree["all"]["reviewed"] == "3" and agree["all"]["not_assessable"] == "1"
    model_of = {page_cards[i]["path"]: page_cards[i]["predicted_class"] for i in order[:3]}
    agreed = sum(by_path[p] == model_of[p] for p in by_path)
    assert agree["all"]["agreed"] == str(agreed) and float(agree["all"]["agreement"]) == pytest.approx(agreed / 2)
    # the plain summary as a table: the runs, then the agreement under its title
    out = io.StringIO()
    ns = build_parser().parse_args(["report", "summary"] + args[:-2])
    assert ns.func(ns, out) == 0
    runs, agreement_table = out.getvalue().split("\nagreement with reviewers, per predicted class (leukray review import):\n")
    assert runs.splitlines()[0].split()[0] == "run_id" and agreement_table.splitlines()[0].split()[0] == "predicted_class"

    dest = tmp_path / "labelled"
    summary = export_labelled(OUTPUT, str(dest), opts)
    assert summary["images"] == 2 and summary["not_assessable"] == 1 and summary["missing"] == 0
    listing = list_labelled_folder(str(dest))
    assert sorted(listing.labels) == sorted(c for c in by_path.values() if c != NOT_ASSESSABLE)


def _page_cards(driver) -> list[dict]:
    return driver.execute_script("return DATA.cards")


def test_counts_of_the_page_follow_the_filters(scored, tmp_path):
    """--reason and --limit select the rows as `leukray report review` does; --audit adds confident rows."""
    opts = scored["opts"]
    with Results(OUTPUT, opts) as r:
        queue = r.review(limit=None, reason="low_confidence")["path"].to_pylist()
    low = len(queue)
    built = build_page(OUTPUT, str(tmp_path / "p"), opts, reason="low_confidence", limit=2, heatmaps=False)
    assert low >= 2 and built["cards"] == 2 and built["heatmaps"] == 0
    cards = json.loads((tmp_path / "p" / "index.html").read_text().split('type="application/json">')[1]
                       .split("</script>")[0])["cards"]
    assert [c["path"] for c in cards] == queue[:2]
    # a check of the guard as the reason: the rows `report review` gives for it; a bad one is named with the allowed
    with Results(OUTPUT, opts) as r:
        by_knn = r.review(limit=None, reason="knn")["path"].to_pylist()
    built = build_page(OUTPUT, str(tmp_path / "k"), opts, reason="knn", limit=0, heatmaps=False)
    assert built["cards"] == len(by_knn)
    with pytest.raises(ReviewError, match="'blurry'.*out_of_distribution, knn, optics, colour, structure"):
        build_page(OUTPUT, str(tmp_path / "b"), opts, reason="blurry", heatmaps=False)
