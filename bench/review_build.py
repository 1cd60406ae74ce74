#!/usr/bin/env python
"""What a review page costs to build: `leukray.review.build_page` over an existing results table, printed as JSON.

    python bench/review_build.py --output OUT [--cards 200] [--model REF] [--html DIR] [--repeat 1]

The page holds the table's flagged rows (lowest confidence first) and, when they are fewer than --cards, confident
rows drawn for audit to make up the number, so the page size does not depend on how good the model is. Reported:
  cards, heatmaps            cards on the page, Grad-CAM overlays computed
  build_s                    the whole build: query, read, decode, Grad-CAM, JPEGs, index.html (best of --repeat)
  heatmap_s_per_image        Grad-CAM time per image (batched forward + backward at the model's input size)
  read_s                     reading the image files (threads)
  build_ms_per_card          build_s / cards
  page_bytes                 index.html + images on disk
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--output", required=True, help="the results table (local or s3://)")
    ap.add_argument("--cards", type=int, default=200)
    ap.add_argument("--model", help="package or registry root for the heat maps (default: the runs' model_uri)")
    ap.add_argument("--html", help="folder for the page (default: a temporary folder)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args()

    import torch

    from leukray.query import Results
    from leukray.review import build_page

    with Results(args.output) as r:
        flagged = r.review(limit=None).num_rows
    audit = max(0, args.cards - flagged)
    html = args.html or tempfile.mkdtemp(prefix="review-bench-")
    runs = [build_page(args.output, html, limit=args.cards, audit=audit, model=args.model,
                       batch_size=args.batch_size) for _ in range(max(1, args.repeat))]
    best = min(runs, key=lambda o: o["total_s"])
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(html) for f in fs)
    print(json.dumps({"output": args.output, "cards": best["cards"], "flagged": best["flagged"],
                      "audit": best["audit"], "heatmaps": best["heatmaps"], "build_s": best["total_s"],
                      "heatmap_s_per_image": best["heatmap_s_per_image"], "read_s": best["read_s"],
                      "build_ms_per_card": round(1000 * best["total_s"] / max(1, best["cards"]), 1),
                      "page_bytes": size, "torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(),
                      "html": html}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
