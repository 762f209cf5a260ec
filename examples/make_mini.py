"""Make ``examples/clothing-mini/``: a small, down-scaled subset of clothing-small.

The README's quick start and its test run on this folder, so a fresh clone works without
``../shared``. Reproduce (needs ``../shared``)::

    EMBEDSEARCH_SHARED=/path/to/shared python examples/make_mini.py  # default: ../shared

Per class and split, a seeded random sample of the shared dataset's files (sorted first, so
the choice does not depend on directory order) is re-encoded with its longest side at
``--size`` pixels (Lanczos, JPEG quality 85, no metadata). Same inputs, same bytes out.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import sys
from pathlib import Path

from PIL import Image, ImageOps

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("EMBEDSEARCH_SHARED", REPO.parent / "shared"))
SOURCE = SHARED / "datasets" / "clothing-small"
OUT = REPO / "examples" / "clothing-mini"

LICENCE = """\
# clothing-mini

A down-scaled subset of **clothing-dataset-small** (10 classes of clothing photos), made by
`examples/make_mini.py` for the README's quick start and its test: {counts}, {n} JPEGs,
longest side {size} px, JPEG quality 85.

## Source and licence

- Source: the public "clothing-dataset-small" by Alexey Grigorev
  (https://github.com/alexeygrigorev/clothing-dataset-small), a subset of the crowd-sourced
  "clothing-dataset" (https://github.com/alexeygrigorev/clothing-dataset).
- Its README states that the dataset "can be freely used for any purpose".
- Changes made here: a seeded random subset per class and split, resized, re-encoded.

The full dataset is the project's benchmark (`benchmarks/clothing_small.py`); this folder
is only the example data.
"""


def parse_split_sizes(text: str) -> dict[str, int]:
    return {k: int(v) for k, v in (part.split("=") for part in text.split(","))}


def shrink(src: Path, dst: Path, size: int) -> None:
    with Image.open(src) as im:
        im = ImageOps.exif_transpose(im).convert("RGB")
        im.thumbnail((size, size), Image.Resampling.LANCZOS)
        dst.parent.mkdir(parents=True, exist_ok=True)
        im.save(dst, "JPEG", quality=85, optimize=True)


def make_mini(source: Path, out: Path, per_split: dict[str, int], size: int, seed: int) -> int:
    if not source.is_dir():
        sys.exit(f"{source} not found: this script needs ../shared/datasets/clothing-small")
    if out.exists():
        shutil.rmtree(out)
    n = 0
    for split, count in per_split.items():
        for cls_dir in sorted(p for p in (source / split).iterdir() if p.is_dir()):
            files = sorted(cls_dir.glob("*.jpg"))
            rng = random.Random(f"{seed}/{split}/{cls_dir.name}")
            for f in sorted(rng.sample(files, min(count, len(files)))):
                shrink(f, out / split / cls_dir.name / f.name, size)
                n += 1
    counts = ", ".join(f"{v} {k}" for k, v in per_split.items()) + " images per class"
    (out / "README.md").write_text(LICENCE.format(counts=counts, n=n, size=size),
                                   encoding="utf-8")
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", type=Path, default=SOURCE)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--per-split", default="train=15,validation=3,test=4")
    ap.add_argument("--size", type=int, default=224, help="longest side, pixels")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    n = make_mini(args.source, args.out, parse_split_sizes(args.per_split), args.size, args.seed)
    total = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    print(f"{n} images, {total / 1e6:.2f} MB in {args.out}")


if __name__ == "__main__":
    main()
