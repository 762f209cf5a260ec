"""Plant near-duplicate variants of images into a folder, with the ground truth.

Takes any folder of images (or makes synthetic "posters": gradients, shapes and titles),
picks ``--originals`` of them, writes each original plus one copy per variant kind, adds
``--distractors`` other images untouched, and writes ``truth.csv`` (columns ``group, id``:
every image, originals and their copies sharing a group; distractors alone). Score any
tool's grouping against it with ``benchmarks/dedupe_generalisation.py`` (one pairwise
scorer for every tool).

Variant kinds (parameters drawn per copy from ``--seed``):
    half       0.5× both sides                      tiny       0.25–0.35× both sides
    crop20     20 % of width and height cut away     watermark  text + a logo box, alpha 0.5
    squash     one side 0.6–0.75× (aspect change)    grey       greyscale (single channel)
    rot30      rotated ±30°, black corners            flip       horizontal mirror
    jpeg       re-encoded at quality 20–40           alpha      RGBA PNG (transparent border)

Run:
    python benchmarks/plant_duplicates.py SRC[,SRC…] OUT [--originals 150] [--distractors 300]
    python benchmarks/plant_duplicates.py --posters 450 OUT_DIR [--poster-size 182x268]
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

import numpy as np

KINDS = ("half", "tiny", "crop20", "watermark", "squash", "grey", "rot30", "flip", "jpeg",
         "alpha")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def make_variant(img, kind: str, rng: np.random.Generator):
    """(image, file suffix) of one planted copy of an RGB image."""
    from PIL import Image, ImageDraw, ImageFont, ImageOps

    w, h = img.size
    if kind == "half":
        return img.resize((max(8, w // 2), max(8, h // 2)), Image.LANCZOS), ".jpg"
    if kind == "tiny":
        s = float(rng.uniform(0.25, 0.35))
        return img.resize((max(8, round(w * s)), max(8, round(h * s))), Image.LANCZOS), ".jpg"
    if kind == "crop20":
        cw, ch = round(w * 0.2), round(h * 0.2)
        left, top = int(rng.integers(0, cw + 1)), int(rng.integers(0, ch + 1))
        return img.crop((left, top, w - (cw - left), h - (ch - top))), ".jpg"
    if kind == "watermark":
        out = img.convert("RGBA")
        layer = Image.new("RGBA", out.size, (0, 0, 0, 0))
        draw = ImageDraw.Draw(layer)
        size = max(10, h // 10)
        font = ImageFont.load_default(size=size)
        text = "© " + "".join(rng.choice(list("ABCDEFGHKLMNPRSTUVWXYZ"), 7))
        x, y = int(rng.integers(0, max(1, w // 3))), int(rng.integers(h // 2, max(h // 2 + 1,
                                                                               h - size * 2)))
        draw.text((x, y), text, font=font, fill=(255, 255, 255, 128), stroke_width=1,
                  stroke_fill=(0, 0, 0, 128))
        box = max(8, w // 8)
        draw.rectangle((w - box - 4, 4, w - 4, 4 + box), fill=(255, 0, 0, 110))
        return Image.alpha_composite(out, layer).convert("RGB"), ".jpg"
    if kind == "squash":
        s = float(rng.uniform(0.6, 0.75))
        size = (round(w * s), h) if rng.random() < 0.5 else (w, round(h * s))
        return img.resize(size, Image.BICUBIC), ".jpg"
    if kind == "grey":
        return ImageOps.grayscale(img), ".jpg"
    if kind == "rot30":
        return img.rotate(30 if rng.random() < 0.5 else -30, Image.BICUBIC), ".jpg"
    if kind == "flip":
        return ImageOps.mirror(img), ".jpg"
    if kind == "jpeg":
        return img, f".q{int(rng.integers(20, 41))}.jpg"
    if kind == "alpha":
        rgba = img.convert("RGBA")
        mask = Image.new("L", (w, h), 0)
        ImageDraw.Draw(mask).rectangle((w // 20, h // 20, w - w // 20, h - h // 20), fill=255)
        rgba.putalpha(mask)
        return rgba, ".png"
    raise ValueError(f"unknown variant kind {kind!r}; known: {', '.join(KINDS)}")


def save(img, path: Path) -> None:
    if path.suffix == ".png":
        img.save(path)
        return
    quality = int(path.suffixes[-2][2:]) if len(path.suffixes) > 1 and \
        path.suffixes[-2].startswith(".q") else 90
    img.save(path, "JPEG", quality=quality)


def synthetic_poster(rng: np.random.Generator, size: tuple[int, int] = (360, 540)):
    """A graphic image: vertical gradient, a few shapes, a title and a subtitle."""
    from PIL import Image, ImageDraw, ImageFont

    w, h = size
    top, bottom = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    t = np.linspace(0, 1, h)[:, None, None]
    grad = (top[None, None, :] * (1 - t) + bottom[None, None, :] * t).repeat(w, axis=1)
    img = Image.fromarray(grad.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(3, 9))):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        x1, y1 = x0 + int(rng.integers(20, w // 2)), y0 + int(rng.integers(20, h // 3))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        shape = rng.integers(0, 3)
        if shape == 0:
            draw.ellipse((x0, y0, x1, y1), fill=colour)
        elif shape == 1:
            draw.rectangle((x0, y0, x1, y1), fill=colour)
        else:
            draw.polygon([(x0, y1), ((x0 + x1) // 2, y0), (x1, y1)], fill=colour)
    letters = list("ABCDEFGHIJKLMNOPRSTUVWYZ ")
    for size_px, y in ((int(rng.integers(36, 60)), int(rng.integers(20, h // 3))),
                       (int(rng.integers(16, 26)), int(rng.integers(2 * h // 3, h - 40)))):
        font = ImageFont.load_default(size=size_px)
        text = "".join(rng.choice(letters, int(rng.integers(6, 14)))).strip() or "TITLE"
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        draw.text((int(rng.integers(5, w // 4)), y), text, font=font, fill=colour)
    return img


def plant(out: Path, originals: list, distractors: list, kinds: tuple[str, ...],
          seed: int) -> Path:
    """Write originals, their variants and the distractors (PIL images or paths) into
    ``out``; returns the truth CSV's path."""
    from PIL import Image, ImageOps

    rng = np.random.default_rng(seed)
    out.mkdir(parents=True, exist_ok=True)
    rows: list[tuple[str, str]] = []

    def load(src):
        if isinstance(src, Path):
            with Image.open(src) as im:
                return ImageOps.exif_transpose(im).convert("RGB")
        return src

    for k, src in enumerate(originals):
        img = load(src)
        group = f"g{k:05d}"
        name = f"o{k:05d}.jpg"
        img.save(out / name, "JPEG", quality=92)
        rows.append((group, name))
        for kind in kinds:
            var, suffix = make_variant(img, kind, rng)
            vname = f"o{k:05d}_{kind}{suffix}"
            save(var, out / vname)
            rows.append((group, vname))
    for k, src in enumerate(distractors):
        name = f"d{k:05d}.jpg"
        load(src).save(out / name, "JPEG", quality=92)
        rows.append((f"d{k:05d}", name))
    truth = out.parent / f"{out.name}-truth.csv"
    with open(truth, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["group", "id"])
        w.writerows(sorted(rows, key=lambda r: r[1]))
    return truth


def images_under(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("src", nargs="?", help="folder(s) of images to draw from, comma-separated")
    ap.add_argument("out", type=Path, help="folder to create (truth: OUT-truth.csv beside it)")
    ap.add_argument("--posters", type=int, help="draw this many synthetic posters instead")
    ap.add_argument("--poster-size", default="360x540", metavar="WxH",
                    help="size of the synthetic posters: drawn at 360x540, then resized "
                    "(182x268: the issue's real poster set)")
    ap.add_argument("--originals", type=int, default=150)
    ap.add_argument("--distractors", type=int, default=300)
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    rng = np.random.default_rng(args.seed)
    kinds = tuple(k for k in args.kinds.split(",") if k)
    if args.posters:
        from PIL import Image

        w, h = (int(v) for v in args.poster_size.lower().split("x"))
        pool: list = [synthetic_poster(rng) for _ in range(args.posters)]
        if (w, h) != (360, 540):
            pool = [p.resize((w, h), Image.LANCZOS) for p in pool]
    elif args.src is not None:
        pool = [p for src in args.src.split(",") for p in images_under(Path(src))]
        pool = [pool[i] for i in rng.permutation(len(pool))]
    else:
        ap.error("give SRC_DIR or --posters N")
    need = args.originals + args.distractors
    if len(pool) < need:
        sys.exit(f"{len(pool)} images available, {need} needed")
    truth = plant(args.out, pool[:args.originals], pool[args.originals:need], kinds, args.seed)
    print(f"wrote {args.out} and {truth}")


if __name__ == "__main__":
    main()
