"""Training time of the default linear and MLP heads on heads_selection.py's synthetic-13k
collection (4 noisy copies of clothing-small train + validation: 13,636 rows, no validation
split) built from each bundle given, e.g. one encoder (1,280-d) and a concatenation (3,840-d):

    python benchmarks/heads_time_13k.py BUNDLE [BUNDLE ...]

One process, so the first MLP fit includes importing torch (about 2 s warm).
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "benchmarks"), str(REPO)]

import heads_selection as hs  # noqa: E402

from embedsearch.classify.heads import make_head  # noqa: E402

if __name__ == "__main__":
    for name in sys.argv[1:]:
        data = hs.synthetic(hs.clothing(name))
        for kind in ("linear", "mlp"):
            r = hs.run_head(make_head(kind, seed=0), data)
            print(name, data[0].shape, kind, f"{r['seconds']} s", r["test"], r["setting"],
                  flush=True)
