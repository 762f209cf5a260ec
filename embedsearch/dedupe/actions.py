"""What to do with duplicates, without ever losing a byte.

- :func:`move_to` moves removed duplicates under another folder, keeping their relative
  paths; the undo manifest (JSON) is written *before* the first file moves and records the
  sha256 of every file, so :func:`undo` restores the folder byte for byte, even after a
  crash half-way.
- :func:`copy_clean_to` builds a clean copy (or hard-link / symlink farm) of everything
  but the removed duplicates; the source is not touched.
- :func:`delete_in_place` exists for users who insist: it needs an explicit flag in the
  CLI, and writes its log of what it deletes (with sha256 and the kept copy) first.

Before touching a file every action checks that it still has the sha256 recorded at
indexing time and that its kept image still exists, so a stale report can never remove
the last copy of an image.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import stat
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from embedsearch.dedupe.group import DedupeResult
from embedsearch.errors import EmbedsearchError, InputError
from embedsearch.store.io import file_digest, read_json, write_json

log = logging.getLogger(__name__)

MOVES_FORMAT = "embedsearch-dedupe-moves"
CLEAN_FORMAT = "embedsearch-dedupe-clean-copy"
DELETE_FORMAT = "embedsearch-dedupe-deletions"
SCHEMA_VERSION = 1
LINK_MODES = ("copy", "hardlink", "symlink")
#: What every entry of an undo manifest must hold (as strings).
_MOVE_KEYS = ("id", "from", "to", "status")


@dataclass
class ActionReport:
    """What an action did: ``done`` ids, ``skipped`` as (id, reason), and its log file."""

    action: str
    log: Path
    done: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {"action": self.action, "log": str(self.log), "done": len(self.done),
                "skipped": len(self.skipped),
                "skipped_examples": [f"{i}: {r}" for i, r in self.skipped[:5]]}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _stamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")


def _resolve(root: Path, item_id: str) -> Path:
    p = Path(item_id)
    return p if p.is_absolute() else root / p


def _relative(item_id: str) -> Path:
    """Where an item goes below a destination folder: its id, made relative."""
    p = Path(item_id)
    rel = Path(*p.parts[1:]) if p.is_absolute() else p
    if ".." in rel.parts:
        raise InputError(f"{item_id}: ids with '..' cannot be placed below another folder")
    return rel


def _check_outside(root: Path, dest: Path, what: str) -> None:
    r, d = root.resolve(), dest.resolve()
    if d == r or d.is_relative_to(r):
        raise InputError(
            f"{what} {dest} is inside the image folder {root}: the next scan would index "
            "those files again",
            hint="choose a folder outside the collection")


def _root_of(result: DedupeResult, root: str | os.PathLike[str] | None) -> Path:
    if root is not None:
        return Path(root)
    if "root" in result.extra:
        return Path(result.extra["root"])
    raise InputError("the result does not know which folder its ids are relative to",
                     hint="pass root=")


def _plan(result: DedupeResult, root: Path) -> list[dict[str, Any]]:
    g = result.groups
    removed = g[~g["kept"]]
    return [{"id": r.id, "sha256": r.sha256, "kept_id": r.kept_id,
             "similarity": float(r.similarity), "match": r.match, "group": int(r.group),
             "reason": r.reason} for r in removed.itertuples()]


def _file_identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of the regular file ``path`` reaches (through symlinks), else None."""
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISREG(st.st_mode) else None


def _safe_to_remove(root: Path, entry: dict[str, Any],
                    removed: set[tuple[int, int]]) -> str | None:
    """None when ``entry`` may leave its place, else the reason it may not.

    Files are compared by what they are (device and inode), not by name: a symlink, an
    aliased folder or a CSV row can reach one file under two ids, and removing the
    "duplicate" would then remove the kept image too. ``removed`` holds the files earlier
    entries of the same run will remove; the accepted entry's file is added to it.
    """
    src = _resolve(root, entry["id"])
    if not src.is_file() or src.is_symlink():
        return "missing (or not a regular file)"
    digest = file_digest(src)
    if entry.get("sha256") and digest != entry["sha256"]:
        return "changed since it was indexed (sha256 differs); rebuild the index"
    entry["sha256"] = digest
    entry["bytes"] = src.stat().st_size
    mine = _file_identity(src)
    if entry.get("kept_id"):  # entries without a kept image (e.g. audit moves) skip this
        kept = _file_identity(_resolve(root, entry["kept_id"]))
        if kept is None or kept in removed:
            return f"its kept image {entry['kept_id']} is gone; not removing the last copy"
        if kept == mine:
            return (f"it is the same file as its kept image {entry['kept_id']} (a symlink, "
                    "hard link or aliased folder); not removing the last copy")
    if mine is not None:
        removed.add(mine)
    return None


def _move_file(src: Path, dst: Path, sha256: str) -> None:
    """Move one file; across file systems copy, fsync, verify, then unlink the source."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if dst.exists() or dst.is_symlink():
        raise FileExistsError(errno.EEXIST, "destination exists", str(dst))
    try:
        os.rename(src, dst)
        return
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
    tmp = dst.with_name(f".tmp-{dst.name}.{os.getpid()}")
    try:
        shutil.copy2(src, tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        if file_digest(tmp) != sha256:
            raise OSError(errno.EIO, "copy does not match the source's sha256", str(tmp))
        os.replace(tmp, dst)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    src.unlink()


def _apply_each(entries: list[dict[str, Any]], report: ActionReport, done: str,
                action: Callable[[dict[str, Any]], object]) -> None:
    """Run ``action`` per entry; a file that fails is recorded as skipped, the rest go on."""
    for e in entries:
        try:
            action(e)
            e["status"] = done
            report.done.append(e["id"])
        except OSError as exc:
            e["status"] = f"skipped: {exc.strerror or exc}"
            report.skipped.append((e["id"], e["status"]))


def move_to(result: DedupeResult, dest: str | os.PathLike[str],
            root: str | os.PathLike[str] | None = None) -> ActionReport:
    """Move every removed duplicate to ``dest/<its id>``; returns the report whose ``log``
    is the undo manifest (pass it to :func:`undo`)."""
    base = _root_of(result, root)
    return move_files(_plan(result, base), dest, base,
                      {"threshold": result.threshold, "keep": result.keep})


def move_files(entries: list[dict[str, Any]], dest: str | os.PathLike[str],
               root: str | os.PathLike[str], record: dict[str, Any] | None = None,
               what: str = "--move-to") -> ActionReport:
    """Move files ``{"id", "sha256"[, "kept_id"]}`` (ids relative to ``root``) to
    ``dest/<id>``, writing the undo manifest (for :func:`undo`) before the first move;
    ``record`` adds fields to it. An entry with a ``kept_id`` moves only while that
    image still exists."""
    base = Path(root)
    dest = Path(dest)
    _check_outside(base, dest, what)
    report = ActionReport("move", dest / f"embedsearch-undo-{_stamp()}.json")
    ready: list[dict[str, Any]] = []
    removed: set[tuple[int, int]] = set()
    for e in entries:
        why = _safe_to_remove(base, e, removed)
        e["from"] = str(_resolve(base, e["id"]))
        e["to"] = str(dest / _relative(e["id"]))
        if why is None and (Path(e["to"]).exists() or Path(e["to"]).is_symlink()):
            why = f"{e['to']} already exists"
        e["status"] = "planned" if why is None else f"skipped: {why}"
        (ready.append(e) if why is None else report.skipped.append((e["id"], why)))
    manifest = {"format": MOVES_FORMAT, "schema_version": SCHEMA_VERSION, "created": _now(),
                "state": "planned", "root": str(base.resolve()), "dest": str(dest.resolve()),
                **(record or {}), "moves": entries}
    write_json(report.log, manifest)  # the undo record exists before anything moves
    try:
        _apply_each(ready, report, "moved",
                    lambda e: _move_file(Path(e["from"]), Path(e["to"]), e["sha256"]))
    finally:
        manifest["state"] = "done"
        manifest["finished"] = _now()
        write_json(report.log, manifest)
    return report


def undo(manifest_path: str | os.PathLike[str]) -> ActionReport:
    """Move the files of a :func:`move_to` back where they were (never overwriting)."""
    path = Path(manifest_path)
    if not path.is_file():
        raise InputError(f"{path}: no such undo manifest")
    manifest = read_json(path)
    if not isinstance(manifest, dict) or manifest.get("format") != MOVES_FORMAT:
        raise InputError(f"{path} is not an embedsearch move manifest")
    moves = manifest.get("moves")
    if not isinstance(manifest.get("dest"), str) or not isinstance(moves, list) or not all(
            isinstance(e, dict) and all(isinstance(e.get(k), str) for k in _MOVE_KEYS)
            for e in moves):
        raise InputError(f"{path} is damaged: an undo manifest needs 'dest' and a list of "
                         f"'moves', each with {', '.join(_MOVE_KEYS)}",
                         hint="use the embedsearch-undo-*.json file that dedupe --move-to "
                         "wrote, unedited")
    report = ActionReport("undo", path)
    for e in manifest["moves"]:
        if e["status"].startswith("skipped") or e["status"] == "restored":
            continue
        src, dst = Path(e["from"]), Path(e["to"])
        if not dst.is_file():
            if src.is_file() and e["status"] == "planned":
                continue  # the move never happened (interrupted run)
            report.skipped.append((e["id"], f"{dst} is gone"))
            continue
        if src.exists() or src.is_symlink():
            report.skipped.append((e["id"], f"{src} exists again; not overwriting it"))
            continue
        digest = file_digest(dst)
        if digest != e["sha256"]:
            log.warning("%s changed after it was moved; restoring it anyway", dst)
        _move_file(dst, src, digest)
        e["status"] = "restored"
        report.done.append(e["id"])
        _prune_empty(dst.parent, Path(manifest["dest"]))
    manifest["state"] = "undone" if not report.skipped else "partly undone"
    manifest["undone"] = _now()
    write_json(path, manifest)
    return report


def _prune_empty(folder: Path, stop: Path) -> None:
    """Remove folders left empty by an undo, up to (not including) ``stop``."""
    with contextlib.suppress(OSError, ValueError):
        stop = stop.resolve()
        folder = folder.resolve()
        while folder != stop and folder.is_relative_to(stop):
            folder.rmdir()  # fails (and stops) when not empty
            folder = folder.parent


def copy_clean_to(result: DedupeResult, dest: str | os.PathLike[str],
                  root: str | os.PathLike[str] | None = None, mode: str = "copy") -> ActionReport:
    """Copy (or hard-link / symlink) every image that is not a removed duplicate (and every
    file that could not be decoded) to ``dest/<its id>``. The source folder is not touched."""
    if mode not in LINK_MODES:
        raise InputError(f"unknown mode {mode!r}", hint=f"use one of: {', '.join(LINK_MODES)}")
    base = _root_of(result, root)
    dest = Path(dest)
    _check_outside(base, dest, "--copy-clean-to")
    removed = set(result.removed_ids)
    report = ActionReport(f"clean-{mode}", dest / f"embedsearch-clean-{_stamp()}.json")
    entries = []
    # Unreadable files were never compared: they are not duplicates, so they are kept too.
    for item_id in [*result.ids.tolist(), *result.extra.get("not_indexed", [])]:
        if item_id in removed:
            continue
        src, dst = _resolve(base, item_id), dest / _relative(item_id)
        entry = {"id": item_id, "from": str(src), "to": str(dst)}
        try:
            if dst.exists() or dst.is_symlink():
                raise FileExistsError(errno.EEXIST, "destination exists")
            dst.parent.mkdir(parents=True, exist_ok=True)
            if mode == "copy":
                shutil.copy2(src, dst)
            elif mode == "hardlink":
                os.link(src, dst)
            else:
                os.symlink(src.resolve(), dst)
            entry["status"] = "done"
            report.done.append(item_id)
        except OSError as exc:
            entry["status"] = f"skipped: {exc.strerror or exc}"
            report.skipped.append((item_id, entry["status"]))
        entries.append(entry)
    write_json(report.log, {"format": CLEAN_FORMAT, "schema_version": SCHEMA_VERSION,
                            "created": _now(), "mode": mode, "root": str(base.resolve()),
                            "threshold": result.threshold, "keep": result.keep,
                            "left_out": sorted(removed), "files": entries})
    return report


def delete_in_place(result: DedupeResult, log_dir: str | os.PathLike[str],
                    root: str | os.PathLike[str] | None = None) -> ActionReport:
    """Delete removed duplicates where they are. The log (ids, sha256, kept copy) is written
    and fsync'ed before the first deletion and updated after."""
    base = _root_of(result, root)
    entries = _plan(result, base)
    report = ActionReport("delete", Path(log_dir) / f"embedsearch-deleted-{_stamp()}.json")
    ready: list[dict[str, Any]] = []
    removed: set[tuple[int, int]] = set()
    for e in entries:
        why = _safe_to_remove(base, e, removed)
        e["path"] = str(_resolve(base, e["id"]))
        e["status"] = "planned" if why is None else f"skipped: {why}"
        (ready.append(e) if why is None else report.skipped.append((e["id"], why)))
    record = {"format": DELETE_FORMAT, "schema_version": SCHEMA_VERSION, "created": _now(),
              "root": str(base.resolve()), "threshold": result.threshold, "keep": result.keep,
              "deletions": entries}
    write_json(report.log, record)
    try:
        _apply_each(ready, report, "deleted", lambda e: Path(e["path"]).unlink())
    finally:
        write_json(report.log, record)
    if not entries and not report.done:
        log.info("nothing to delete")
    return report


def check_action_args(move_to: Any, copy_clean_to: Any, delete: bool) -> None:
    """At most one action per run."""
    chosen = [n for n, v in (("--move-to", move_to), ("--copy-clean-to", copy_clean_to),
                             ("--delete", delete)) if v]
    if len(chosen) > 1:
        raise EmbedsearchError(f"choose one action, not {' and '.join(chosen)}")
