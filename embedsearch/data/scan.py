"""Turn a folder or a CSV/parquet manifest into a deterministic list of image records.

An image id is the POSIX path of the file relative to the root (the folder, or the folder
that holds the CSV). Scan order is sorted by id, so two scans of the same tree agree.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import os
import re
import stat
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from embedsearch.data.images import ALLOWED_FORMATS, sniff_format
from embedsearch.errors import InputError

if TYPE_CHECKING:
    import pandas as pd

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
    split_map: str | dict[str, str] | None = None,
) -> Collection:
    """Scan a folder (class sub-folders, optional train/val/test level) or a CSV/parquet file.

    ``split_map`` ("sample_train=train,holdout=test") names splits that are not recognised
    from their words (see :func:`split_of`).
    """
    split_map = parse_split_map(split_map)
    src = Path(source)
    if not src.exists():
        raise InputError(f"{src}: no such file or folder", hint="give an image folder or a CSV")
    if src.is_dir():
        return scan_folder(src, follow_symlinks=follow_symlinks, split_map=split_map)
    if src.suffix.lower() in {".csv", ".tsv", ".parquet", ".pq"}:
        if not src.is_file():  # a FIFO would block the reader, /dev/zero never end
            raise InputError(f"{src}: not a regular file (a FIFO, socket or device)",
                             hint="give a CSV, TSV or parquet file")
        return scan_table(
            src,
            path_col=path_col,
            label_col=label_col,
            split_col=split_col,
            skip_missing=skip_missing,
            split_map=split_map,
        )
    raise InputError(
        f"{src}: not a folder, CSV or parquet file",
        hint="pass a folder with one sub-folder per class, or a .csv/.parquet of paths and labels",
    )


#: Words that name a split inside a folder name or split value (``sample_train``,
#: ``train2017``, ``imagenet-val``, ``dev``): a word equal to one of these, or starting with
#: one of the ``SPLIT_PREFIXES``.
SPLIT_WORDS = {"train": "train", "trn": "train", "val": "val", "valid": "val",
               "validation": "val", "dev": "val", "test": "test", "tst": "test"}
SPLIT_PREFIXES = {"train": "train", "valid": "val", "test": "test"}


def parse_split_map(text: str | dict[str, str] | None) -> dict[str, str]:
    """``"sample_train=train,holdout=test"`` → {"sample_train": "train", "holdout": "test"}."""
    if not text:
        return {}
    pairs = text.items() if isinstance(text, dict) else (
        part.split("=", 1) if "=" in part else (part, "") for part in text.split(",")
        if part.strip())
    out: dict[str, str] = {}
    for name, split in pairs:
        target = SPLIT_ALIASES.get(split.strip().lower())
        if not name.strip() or target is None:
            raise InputError(f"--split-map: cannot read {name}={split}",
                             hint="write NAME=SPLIT pairs with SPLIT train, val or test, e.g. "
                             "--split-map sample_train=train,sample_test=test")
        out[name.strip()] = target
    return out


def split_of(name: str, split_map: dict[str, str] | None = None) -> str | None:
    """The split ("train", "val" or "test") a folder name or split value stands for, or
    None. ``split_map`` (exact names, case-insensitive) wins over the recognised words;
    a name with words of two splits (``train_test``) is not a split."""
    if split_map:
        lowered = {k.lower(): v for k, v in split_map.items()}
        if name.lower() in lowered:
            return lowered[name.lower()]
    found = set()
    for word in re.findall(r"[a-z]+", name.lower()):
        hit = SPLIT_WORDS.get(word) or next(
            (split for prefix, split in SPLIT_PREFIXES.items() if word.startswith(prefix)), None)
        if hit:
            found.add(hit)
    return found.pop() if len(found) == 1 else None


def _split_layout(root: Path, split_map: dict[str, str] | None = None,
                  follow_symlinks: bool = False) -> list[tuple[str, Path]]:
    """[(split, folder)] when every top-level folder names a split (``train``,
    ``sample_train``, ``val2017``… or a ``split_map`` name) and one is train or test, else
    []. Split folders reached by a symlink count when ``follow_symlinks``."""
    found: list[tuple[str, Path]] = []
    others = False
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        if entry.name.startswith("."):
            continue
        if entry.is_dir(follow_symlinks=False) or (
                follow_symlinks and entry.is_symlink() and entry.is_dir(follow_symlinks=True)):
            split = split_of(entry.name, split_map)
            if split is None:
                others = True
            else:
                found.append((split, Path(entry.path)))
    if found and not others and any(s in ("train", "test") for s, _ in found):
        return found
    return []


def scan_folder(root: Path, *, follow_symlinks: bool = False,
                split_map: dict[str, str] | None = None) -> Collection:
    """Scan ``root`` recursively.

    Labels come from the first folder level below ``root`` (below ``root/<split>`` when the
    top level is train/val/test). Symlinks are not followed by default; hard links to one
    file are counted once.
    """
    root = root.resolve()
    try:
        layout = _split_layout(root, split_map, follow_symlinks)
    except OSError as exc:
        raise InputError(f"{root}: cannot list the folder ({exc.strerror or exc})",
                         hint="check the folder's permissions") from exc
    bases: Iterable[tuple[str | None, Path]] = layout or [(None, root)]
    records: list[Record] = []
    skipped: list[Skipped] = []
    seen_inodes: dict[tuple[int, int], str] = {}
    # With split folders the root itself is never walked: a link back to it is a loop too.
    walked = {(root.stat().st_dev, root.stat().st_ino)} if layout else set()
    for split, base in bases:
        for path, rid in _walk(root, base, follow_symlinks, skipped, walked):
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
    records = _disambiguate(records)
    _check_unique_ids(records)
    if not records:
        raise InputError(
            f"{root}: no images found"
            + (f" ({len(skipped)} files skipped: {_reasons(skipped)})" if skipped else ""),
            hint=f"supported formats: {', '.join(sorted(IMAGE_EXTENSIONS))}",
        )
    return Collection(root, records, skipped, source="folder")


def _walk(
    root: Path, base: Path, follow_symlinks: bool, skipped: list[Skipped],
    visited: set[tuple[int, int]] | None = None,
) -> Iterable[tuple[Path, str]]:
    """Yield (path, id) for regular files under ``base`` in sorted order, guarding loops
    (``visited``: folders already walked, shared between the split folders of a root)."""
    visited = set() if visited is None else visited
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
                # Links to folders are followed wherever they point (split folders kept
                # elsewhere): the user asked, and loops are caught below. A link to a file
                # outside the root still is not.
                if not target.is_relative_to(root) and not target.is_dir():
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


def _disambiguate(records: list[Record]) -> list[Record]:
    """Sorted records with unique ids, even where two names print alike.

    A folder cannot hold one name twice, but a non-UTF-8 name spelled with ``\\xff``
    escapes (see _printable) can equal a real name typed with backslashes. The name that
    is real text keeps its id; the escaped one gets ``~`` and a short hash of its raw bytes
    before the extension, which is the same in every scan of the same tree.
    """
    records.sort(key=lambda r: r.id)
    taken = {r.id for r in records}
    out: list[Record] = []
    for group_id, group in itertools.groupby(records, key=lambda r: r.id):
        group = list(group)
        if len(group) == 1:
            out.extend(group)
            continue
        for rec in group:
            raw = os.fsencode(rec.path)
            if _printable(os.fsdecode(raw)) == os.fsdecode(raw):
                out.append(rec)
                continue
            tag = hashlib.sha256(raw).hexdigest()[:8]
            stem, dot, ext = group_id.rpartition(".")
            new_id = f"{stem}~{tag}.{ext}" if dot and "/" not in ext else f"{group_id}~{tag}"
            if new_id in taken:
                out.append(rec)  # left for _check_unique_ids to report
                continue
            taken.add(new_id)
            out.append(dataclasses.replace(rec, id=new_id))
    out.sort(key=lambda r: r.id)
    return out


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
    split_map: dict[str, str] | None = None,
) -> Collection:
    """Read image paths (and optional labels and splits) from a CSV, TSV or parquet file."""
    import pandas as pd

    table = table.resolve()
    try:
        if table.suffix.lower() in {".parquet", ".pq"}:
            df = pd.read_parquet(table)
        else:
            # Only empty cells are missing: "NA", "None", "null" are literal labels here.
            df = pd.read_csv(table, sep="\t" if table.suffix.lower() == ".tsv" else ",",
                             keep_default_na=False, na_values=[""])
    except Exception as exc:  # pandas raises many types for malformed tables
        raise InputError(f"{table}: cannot read the table: {exc}") from exc
    columns = [str(c) for c in df.columns]
    pcol = _pick_column(columns, path_col, PATH_COLUMNS, "path", table, required=True)
    lcol = _pick_column(columns, label_col, LABEL_COLUMNS, "label", table, required=False)
    scol = _pick_column(columns, split_col, ("split",), "split", table, required=False)
    root = table.parent
    splits = _table_splits(df, scol, split_map, table) if scol else None
    records: list[Record] = []
    missing: list[Skipped] = []
    for n, row in enumerate(df.itertuples(index=False)):
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
        records.append(Record(rid, path, label, splits[n] if splits else None))
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


def _table_splits(df: pd.DataFrame, column: str, split_map: dict[str, str] | None,
                  table: Path) -> list[str | None]:
    """Each row's split from the split column: recognised words (``sample_test`` → test)
    or ``split_map``; any other value is an error that lists them (a silently unknown
    split would put test rows into the kNN reference)."""
    raw = [_label_text(v) for v in df[column].tolist()]
    mapped = {v: split_of(v, split_map) for v in set(raw) if v is not None}
    unknown = {v: raw.count(v) for v, split in mapped.items() if split is None}
    if unknown:
        listed = ", ".join(f"{v!r} ({n} rows)" for v, n in sorted(unknown.items()))
        example = ",".join(f"{v}=test" for v in sorted(unknown)[:2])
        raise InputError(
            f"{table}: the split column {column!r} has values that are not train, val or "
            f"test: {listed}",
            hint=f"say what they are with --split-map, e.g. --split-map {example}")
    return [mapped[v] if v is not None else None for v in raw]
