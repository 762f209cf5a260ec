"""Turn a folder or a CSV/parquet manifest into a deterministic list of image records.

An image id is the POSIX path of the file relative to the root (the folder, or the folder
that holds the CSV). Scan order is sorted by id, so two scans of the same tree agree.
"""

from __future__ import annotations

import itertools
import os
import stat
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from embedsearch.data.images import ALLOWED_FORMATS, sniff_format
from embedsearch.errors import InputError

#: Extensions that are read as images. Everything else is ignored, except the ones below.
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff",
                              ".ppm", ".pgm", ".pbm", ".pnm", ".mpo"})
#: Image-like files we cannot decode safely: reported as skipped, not silently ignored.
UNSUPPORTED_IMAGE_EXTENSIONS = frozenset(
    {".svg", ".svgz", ".heic", ".heif", ".avif", ".ico", ".psd", ".jxl", ".raw", ".cr2", ".nef"}
)
SPLIT_ALIASES = {"train": "train", "val": "val", "valid": "val", "validation": "val",
                 "test": "test"}
PATH_COLUMNS = ("path", "filepath", "file_path", "file", "filename", "image", "image_path")
LABEL_COLUMNS = ("label", "class", "category", "target", "y")


@dataclass(frozen=True)
class Record:
    """One image to embed: ``id`` is the stable key everywhere downstream."""

    id: str
    path: Path
    label: str | None = None
    split: str | None = None


@dataclass(frozen=True)
class Skipped:
    """A file that was found but will not be read, with a reason code."""

    id: str
    reason: str
    detail: str = ""


@dataclass
class Collection:
    """The result of a scan."""

    root: Path
    records: list[Record]
    skipped: list[Skipped] = field(default_factory=list)
    source: str = "folder"

    @property
    def labelled(self) -> bool:
        return any(r.label is not None for r in self.records)

    @property
    def classes(self) -> list[str]:
        return sorted({r.label for r in self.records if r.label is not None})

    @property
    def splits(self) -> list[str]:
        return sorted({r.split for r in self.records if r.split is not None})


def scan(
    source: str | os.PathLike[str],
    *,
    path_col: str | None = None,
    label_col: str | None = None,
    split_col: str | None = None,
    follow_symlinks: bool = False,
    skip_missing: bool = False,
) -> Collection:
    """Scan a folder (class sub-folders, optional train/val/test level) or a CSV/parquet file."""
    src = Path(source)
    if not src.exists():
        raise InputError(f"{src}: no such file or folder", hint="give an image folder or a CSV")
    if src.is_dir():
        return scan_folder(src, follow_symlinks=follow_symlinks)
    if src.suffix.lower() in {".csv", ".tsv", ".parquet", ".pq"}:
        return scan_table(
            src,
            path_col=path_col,
            label_col=label_col,
            split_col=split_col,
            skip_missing=skip_missing,
        )
    raise InputError(
        f"{src}: not a folder, CSV or parquet file",
        hint="pass a folder with one sub-folder per class, or a .csv/.parquet of paths and labels",
    )


def _split_layout(root: Path) -> dict[str, Path]:
    """Return {split: folder} when the top level is train/val/test, else {}."""
    found: dict[str, Path] = {}
    others = False
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if entry.is_dir(follow_symlinks=False):
            split = SPLIT_ALIASES.get(entry.name.lower())
            if split is None:
                others = True
            elif split not in found:
                found[split] = Path(entry.path)
    if found and not others and ("train" in found or "test" in found):
        return found
    return {}


def scan_folder(root: Path, *, follow_symlinks: bool = False) -> Collection:
    """Scan ``root`` recursively.

    Labels come from the first folder level below ``root`` (below ``root/<split>`` when the
    top level is train/val/test). Symlinks are not followed by default; hard links to one
    file are counted once.
    """
    root = root.resolve()
    try:
        layout = _split_layout(root)
    except OSError as exc:
        raise InputError(f"{root}: cannot list the folder ({exc.strerror or exc})",
                         hint="check the folder's permissions") from exc
    bases: Iterable[tuple[str | None, Path]] = layout.items() if layout else [(None, root)]
    records: list[Record] = []
    skipped: list[Skipped] = []
    seen_inodes: dict[tuple[int, int], str] = {}
    for split, base in bases:
        for path, rid in _walk(root, base, follow_symlinks, skipped):
            ext = path.suffix.lower()
            if ext not in IMAGE_EXTENSIONS:
                # The extension may lie (a JPEG saved as .svg or .dat): the header decides.
                fmt = sniff_format(path)
                if fmt is None and ext in UNSUPPORTED_IMAGE_EXTENSIONS:
                    skipped.append(Skipped(rid, "unsupported_format",
                                           f"{ext} files are not decoded"))
                    continue
                if fmt is None:
                    continue  # not an image at all (notes, CSVs…)
                if fmt not in ALLOWED_FORMATS:
                    skipped.append(Skipped(rid, "unsupported_format",
                                           f"{fmt} images are not decoded"))
                    continue
            try:
                st = path.stat() if follow_symlinks else path.lstat()
            except OSError as exc:
                skipped.append(Skipped(rid, "unreadable", exc.strerror or str(exc)))
                continue
            key = (st.st_dev, st.st_ino)
            if st.st_nlink > 1 and key in seen_inodes:
                skipped.append(Skipped(rid, "hardlink_duplicate",
                                       f"same file as {seen_inodes[key]}"))
                continue
            seen_inodes[key] = rid
            rel_to_base = path.relative_to(base).parts
            label = rel_to_base[0] if len(rel_to_base) > 1 else None
            records.append(Record(rid, path, _nfc(label) if label else None, split))
    records.sort(key=lambda r: r.id)
    _check_unique_ids(records)
    if not records:
        raise InputError(
            f"{root}: no images found"
            + (f" ({len(skipped)} files skipped: {_reasons(skipped)})" if skipped else ""),
            hint=f"supported formats: {', '.join(sorted(IMAGE_EXTENSIONS))}",
        )
    return Collection(root, records, skipped, source="folder")


def _walk(
    root: Path, base: Path, follow_symlinks: bool, skipped: list[Skipped]
) -> Iterable[tuple[Path, str]]:
    """Yield (path, id) for regular files under ``base`` in sorted order, guarding loops."""
    visited: set[tuple[int, int]] = set()
    stack = [base]
    while stack:
        folder = stack.pop()
        try:
            st = folder.stat()
            entries = sorted(os.scandir(folder), key=lambda e: e.name, reverse=True)
        except OSError as exc:
            skipped.append(Skipped(_rel(root, folder), "unreadable", exc.strerror or str(exc)))
            continue
        if (st.st_dev, st.st_ino) in visited:
            skipped.append(Skipped(_rel(root, folder), "symlink_loop", "folder visited twice"))
            continue
        visited.add((st.st_dev, st.st_ino))
        files: list[tuple[Path, str]] = []
        for entry in entries:
            path = Path(entry.path)
            if entry.name.startswith("."):
                continue
            if entry.is_symlink():
                if not follow_symlinks:
                    skipped.append(Skipped(_rel(root, path), "symlink",
                                           "symlinks are not followed (--follow-symlinks)"))
                    continue
                try:
                    target = path.resolve(strict=True)
                except (OSError, RuntimeError):
                    skipped.append(Skipped(_rel(root, path), "symlink_broken", "cannot resolve"))
                    continue
                if not target.is_relative_to(root):
                    skipped.append(
                        Skipped(_rel(root, path), "symlink_outside_root", f"points to {target}")
                    )
                    continue
            try:
                mode = entry.stat(follow_symlinks=follow_symlinks).st_mode
            except OSError as exc:
                skipped.append(Skipped(_rel(root, path), "unreadable", exc.strerror or str(exc)))
                continue
            if stat.S_ISDIR(mode):
                stack.append(path)
            elif stat.S_ISREG(mode):
                files.append((path, _rel(root, path)))
            elif path.suffix.lower() in IMAGE_EXTENSIONS:
                # A FIFO or device named like an image would block or stream forever.
                skipped.append(Skipped(_rel(root, path), "not_a_regular_file",
                                       "a FIFO, socket or device, not a file"))
        yield from reversed(files)


def _rel(root: Path, path: Path) -> str:
    # Ids keep the names the file system gave: NFC and NFD spellings of one name are two
    # different files on Linux. Only labels are normalised (see _nfc).
    try:
        return _printable(path.relative_to(root).as_posix())
    except ValueError:
        return _printable(path.as_posix())


def _printable(name: str) -> str:
    """A name that is valid UTF-8 text (parquet, JSON and terminals need that).

    Linux names are bytes; ones that are not UTF-8 reach Python as lone surrogates, which
    pyarrow cannot store. Those bytes are spelled ``\\xff`` instead; the record keeps the
    real path for reading.
    """
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        return os.fsencode(name).decode("utf-8", "backslashreplace")


def _nfc(text: str) -> str:
    """Class names typed on different systems compare equal once NFC-normalised."""
    return unicodedata.normalize("NFC", _printable(text))


def _check_unique_ids(records: list[Record]) -> None:
    for a, b in itertools.pairwise(records):
        if a.id == b.id:
            raise InputError(f"the image {a.id!r} is listed twice", hint="remove duplicate rows")


def _reasons(skipped: list[Skipped]) -> str:
    counts: dict[str, int] = {}
    for s in skipped:
        counts[s.reason] = counts.get(s.reason, 0) + 1
    return ", ".join(f"{n} {reason}" for reason, n in sorted(counts.items()))


def _pick_column(columns: list[str], wanted: str | None, candidates: tuple[str, ...], what: str,
                 table: Path, required: bool) -> str | None:
    if wanted is not None:
        if wanted not in columns:
            raise InputError(
                f"{table}: no column {wanted!r} for the {what}; columns are {columns}",
                hint=f"pass --{what}-col with one of the columns above",
            )
        return wanted
    lower = {c.lower(): c for c in columns}
    for cand in candidates:
        if cand in lower:
            return lower[cand]
    if required:
        raise InputError(
            f"{table}: cannot tell which column holds the image {what}s; columns are {columns}",
            hint=f"pass --{what}-col NAME (looked for: {', '.join(candidates)})",
        )
    return None


def _label_text(value: object) -> str | None:
    import math

    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, bool) or type(value).__name__ == "bool_":
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    text = str(value).strip()
    return text or None


def scan_table(
    table: Path,
    *,
    path_col: str | None = None,
    label_col: str | None = None,
    split_col: str | None = None,
    skip_missing: bool = False,
) -> Collection:
    """Read image paths (and optional labels and splits) from a CSV, TSV or parquet file."""
    import pandas as pd

    table = table.resolve()
    try:
        if table.suffix.lower() in {".parquet", ".pq"}:
            df = pd.read_parquet(table)
        else:
            df = pd.read_csv(table, sep="\t" if table.suffix.lower() == ".tsv" else ",",
                             keep_default_na=True)
    except Exception as exc:  # pandas raises many types for malformed tables
        raise InputError(f"{table}: cannot read the table: {exc}") from exc
    columns = [str(c) for c in df.columns]
    pcol = _pick_column(columns, path_col, PATH_COLUMNS, "path", table, required=True)
    lcol = _pick_column(columns, label_col, LABEL_COLUMNS, "label", table, required=False)
    scol = _pick_column(columns, split_col, ("split",), "split", table, required=False)
    root = table.parent
    records: list[Record] = []
    missing: list[Skipped] = []
    for row in df.itertuples(index=False):
        values = dict(zip(columns, row, strict=True))
        raw = values[pcol]
        if not isinstance(raw, str) or not raw.strip():
            missing.append(Skipped(str(raw), "missing_file", "empty path"))
            continue
        path = Path(raw)
        path = path if path.is_absolute() else root / path
        path = Path(os.path.normpath(path))
        try:
            rid = path.relative_to(root).as_posix()
        except ValueError:
            rid = path.as_posix()
        if not path.is_file():
            missing.append(Skipped(rid, "missing_file", str(path)))
            continue
        label = _label_text(values[lcol]) if lcol else None
        split = None
        if scol:
            raw_split = _label_text(values[scol])
            split = SPLIT_ALIASES.get(raw_split.lower(), raw_split) if raw_split else None
        records.append(Record(rid, path, label, split))
    if missing and not skip_missing:
        shown = "\n".join(f"  {m.id}" for m in missing[:5])
        more = f"\n  … and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise InputError(
            f"{table}: {len(missing)} of {len(df)} listed images do not exist:\n{shown}{more}",
            hint="fix the paths (relative paths are read from the CSV's folder), "
            "or pass --skip-missing to build from the rest",
        )
    if not records:
        raise InputError(f"{table}: lists no existing images")
    records.sort(key=lambda r: r.id)
    _check_unique_ids(records)
    return Collection(root, records, missing, source=f"table:{table.name}")
