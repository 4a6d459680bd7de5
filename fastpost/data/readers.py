"""Readers for the caption formats users already have -> the records preprocess consumes.

Every reader returns a `Records`: the folder the input paths are relative to (`base`), one dict per input with
`path` (relative to base, as recorded in the manifest) and `caption`, plus the entries it had to skip (a row
with no caption or no media), each `{"source", "error"}`, which preprocess counts with the unreadable inputs.
A webdataset record also has `member`: the file inside the `.tar` at `path` (decoded from the archive), and
`member_offset` / `member_size`: where its bytes are in an uncompressed tar.

    metadata.jsonl    {"path": "videos/0.mp4", "caption": "..."} per line               read_jsonl
    FastVideo JSON    [{"path", "cap": [...], "resolution", "fps", "duration"}, ...]   read_fastvideo_json
    diffusers txt     prompts.txt + videos.txt, one per line, same order               read_txt_pairs
    CSV               columns path|video and caption|text                              read_csv
    webdataset        .tar shards: x.mp4 / x.jpg with x.json {"caption": ...}          read_webdataset

`read_records(data, data_format="auto")` picks the reader from the path (see `detect_format`).
"""

from __future__ import annotations

import csv
import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

FORMATS = ("jsonl", "fastvideo_json", "txt_pairs", "csv", "webdataset")
MEDIA_EXTS = {".mp4", ".webm", ".mkv", ".avi", ".mov", ".gif", ".png", ".jpg", ".jpeg", ".webp", ".bmp"}


@dataclass
class Records:
    base: Path  # record paths are relative to this folder
    rows: list[dict[str, Any]]  # each: path, caption (+ member for webdataset; other keys kept for reference)
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"source", "error"} rows that had no input


def source_of(row: dict[str, Any]) -> str:
    """The input's name in the manifest and the report: its path, or `<tar>/<member>` for a webdataset sample."""
    return f"{row['path']}/{row['member']}" if row.get("member") else str(row["path"])


def _missing(path: Path, fmt: str, example: str) -> FileNotFoundError:
    return FileNotFoundError(f"{fmt} file {str(path)!r} not found; it should look like: {example}")


def _caption(value: Any) -> str | None:
    """A caption string, the first of a list of captions, or None when there is none."""
    if isinstance(value, (list, tuple)):
        value = next((v for v in value if isinstance(v, str) and v.strip()), None)
    return value if isinstance(value, str) and value.strip() else None


def read_jsonl(path: str | Path) -> Records:
    """fastpost's metadata.jsonl: one JSON object per line with `path` (relative to the file) and `caption`."""
    path = Path(path)
    if not path.is_file():
        raise _missing(path, "metadata", '{"path": "videos/0.mp4", "caption": "..."} per line '
                       "(scripts/make_synthetic_videos.py writes one)")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            row = json.loads(line)
            if "path" not in row or "caption" not in row:
                raise ValueError(f"{path}:{n}: each row needs 'path' and 'caption', got keys {sorted(row)}")
            rows.append(row)
    return Records(path.parent, rows)


def read_fastvideo_json(path: str | Path) -> Records:
    """FastVideo's videos2caption JSON: a list of {"path", "cap": [captions], "resolution": {"height", "width"},
    "fps", "duration"}. Paths are relative to the JSON's folder; the first non-empty caption of `cap` is used
    (the encode is deterministic, so one caption per clip). Entries without a caption are skipped."""
    path = Path(path)
    if not path.is_file():
        raise _missing(path, "FastVideo JSON", '[{"path": "0.mp4", "cap": ["..."], "fps": 24, "duration": 2.0}]')
    data = json.loads(path.read_text())
    if not isinstance(data, list):
        raise ValueError(f"{path}: a FastVideo JSON is a list of objects with 'path' and 'cap', got a "
                         f"{type(data).__name__}")
    rows, skipped = [], []
    for i, item in enumerate(data):
        src = str(item.get("path", f"<entry {i}>")) if isinstance(item, dict) else f"<entry {i}>"
        cap = _caption(item.get("cap")) if isinstance(item, dict) else None
        if not isinstance(item, dict) or "path" not in item or cap is None:
            skipped.append({"source": src, "error": "entry needs 'path' and a non-empty 'cap'"})
            continue
        row = {"path": str(item["path"]), "caption": cap}
        res = item.get("resolution")
        if isinstance(res, dict):
            row.update({k: res[k] for k in ("height", "width") if k in res})
        row.update({k: item[k] for k in ("fps", "duration", "num_frames") if k in item})
        rows.append(row)
    return Records(path.parent, rows, skipped)


def read_txt_pairs(folder: str | Path, prompts: str = "prompts.txt", videos: str = "videos.txt") -> Records:
    """diffusers' training-script layout: prompts.txt and videos.txt in one folder, line i of each belongs
    together; video paths are relative to the folder. A pair with an empty prompt or path is skipped."""
    folder = Path(folder)
    files = [folder / prompts, folder / videos]
    for f in files:
        if not f.is_file():
            raise _missing(f, "diffusers txt", f"{prompts} and {videos} side by side, one prompt / one path a line")
    caps, paths = (f.read_text().splitlines() for f in files)
    # trailing blank lines are not entries; any other length mismatch means the files do not belong together
    while caps and not caps[-1].strip():
        caps.pop()
    while paths and not paths[-1].strip():
        paths.pop()
    if len(caps) != len(paths):
        raise ValueError(f"{files[0]} has {len(caps)} lines but {files[1]} has {len(paths)}; line i of each must "
                         f"describe the same video")
    rows, skipped = [], []
    for n, (cap, p) in enumerate(zip(caps, paths), 1):
        if not cap.strip() or not p.strip():
            skipped.append({"source": p.strip() or f"<{videos} line {n}>", "error": f"line {n}: empty prompt or path"})
            continue
        rows.append({"path": p.strip(), "caption": cap.strip()})
    return Records(folder, rows, skipped)


def read_csv(path: str | Path) -> Records:
    """A CSV with a header naming a `path` (or `video`) column and a `caption` (or `text`) column; paths are
    relative to the CSV's folder; other columns are kept. Rows with an empty path or caption are skipped."""
    path = Path(path)
    if not path.is_file():
        raise _missing(path, "CSV", "a header line `path,caption` then one row per video")
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        cols = reader.fieldnames or []
        path_col = next((c for c in ("path", "video") if c in cols), None)
        cap_col = next((c for c in ("caption", "text") if c in cols), None)
        if path_col is None or cap_col is None:
            raise ValueError(f"{path}: the CSV header needs a 'path' or 'video' column and a 'caption' or 'text' "
                             f"column, got {cols}")
        rows, skipped = [], []
        for n, rec in enumerate(reader, 2):
            p, cap = (rec.get(path_col) or "").strip(), (rec.get(cap_col) or "").strip()
            if not p or not cap:
                skipped.append({"source": p or f"<{path.name} line {n}>", "error": f"line {n}: empty path or caption"})
                continue
            extra = {k: v for k, v in rec.items() if k not in (path_col, cap_col) and k is not None}
            rows.append({**extra, "path": p, "caption": cap})
    return Records(path.parent, rows, skipped)


def _tar_files(data: Path) -> list[Path]:
    return [data] if data.is_file() else sorted(p for p in data.iterdir() if p.suffix == ".tar")


def read_webdataset(data: str | Path) -> Records:
    """webdataset shards as MCM and others write them: in each `.tar`, the files of one sample share a key
    (the name up to the first dot): `x.mp4` or `x.jpg` (any media extension) and `x.json` holding
    {"caption": ...} (or `x.txt` holding the caption). `data` is one .tar or a folder of them. A sample with
    no media or no caption is skipped; media bytes are read from the archive at decode time."""
    data = Path(data)
    if not data.exists():
        raise _missing(data, "webdataset", "a .tar (or a folder of .tar) holding x.mp4 + x.json {\"caption\": ...}")
    tars = _tar_files(data)
    if not tars:
        raise FileNotFoundError(f"no .tar shards in {str(data)!r}; pass a webdataset .tar or a folder of them")
    base = data.parent if data.is_file() else data
    rows, skipped = [], []
    for tar_path in tars:
        samples: dict[str, dict[str, Any]] = {}
        try:  # an uncompressed tar gives byte offsets that decoding can seek to; a compressed one does not
            tar, plain = tarfile.open(tar_path, "r:"), True
        except tarfile.ReadError:
            tar, plain = tarfile.open(tar_path, "r:*"), False
        with tar:
            for m in tar.getmembers():
                if not m.isfile():
                    continue
                d, _, name = m.name.rpartition("/")
                key, _, ext = name.partition(".")
                s = samples.setdefault(f"{d}/{key}" if d else key, {})
                ext = "." + ext.lower()
                if ext in MEDIA_EXTS and "media" not in s:
                    s["media"], s["span"] = m.name, (m.offset_data, m.size)
                elif ext == ".json":
                    try:
                        s["caption"] = _caption(json.loads(tar.extractfile(m).read()).get("caption"))
                    except (ValueError, AttributeError) as e:
                        s["error"] = f"{m.name}: unreadable json ({type(e).__name__})"
                elif ext in (".txt", ".caption") and not s.get("caption"):
                    s["caption"] = _caption(tar.extractfile(m).read().decode("utf-8", "replace").strip())
        rel = str(tar_path.relative_to(base))
        for key, s in samples.items():
            if s.get("media") and s.get("caption"):
                # where the bytes sit in the (uncompressed) tar: decoding seeks there instead of rescanning
                row = {"path": rel, "member": s["media"], "caption": s["caption"]}
                if plain:
                    row.update(member_offset=s["span"][0], member_size=s["span"][1])
                rows.append(row)
            else:
                why = s.get("error") or ("no caption (x.json with 'caption')" if s.get("media") else "no video/image")
                skipped.append({"source": f"{rel}/{s.get('media') or key}", "error": why})
    return Records(base, rows, skipped)


READERS = {"jsonl": read_jsonl, "fastvideo_json": read_fastvideo_json, "txt_pairs": read_txt_pairs,
           "csv": read_csv, "webdataset": read_webdataset}


def detect_format(data: str | Path) -> tuple[str, Path]:
    """(format, the path its reader takes) from a file's extension or a folder's contents:
    .jsonl -> jsonl, .json -> fastvideo_json, .csv -> csv, .tar -> webdataset, videos.txt / prompts.txt ->
    txt_pairs; a folder holding metadata.jsonl, prompts.txt + videos.txt, .tar shards, or exactly one .csv /
    .json -> that format."""
    p = Path(data)
    if p.is_file():
        by_ext = {".jsonl": "jsonl", ".json": "fastvideo_json", ".csv": "csv", ".tar": "webdataset"}
        if p.suffix.lower() in by_ext:
            return by_ext[p.suffix.lower()], p
        if p.name in ("prompts.txt", "videos.txt"):
            return "txt_pairs", p.parent
        raise ValueError(f"cannot tell the format of {str(p)!r} from its extension; set data_format to one of "
                         f"{FORMATS}")
    if p.is_dir():
        if (p / "metadata.jsonl").is_file():
            return "jsonl", p / "metadata.jsonl"
        if (p / "prompts.txt").is_file() and (p / "videos.txt").is_file():
            return "txt_pairs", p
        if any(x.suffix == ".tar" for x in p.iterdir()):
            return "webdataset", p
        for ext, fmt in ((".csv", "csv"), (".json", "fastvideo_json")):
            found = sorted(p.glob(f"*{ext}"))
            if len(found) == 1:
                return fmt, found[0]
        raise ValueError(f"no known input in folder {str(p)!r}: expected metadata.jsonl, prompts.txt + videos.txt, "
                         f".tar shards, or one .csv / .json; or pass the file itself as data")
    raise FileNotFoundError(f"data {str(p)!r} does not exist; pass a metadata.jsonl, FastVideo .json, .csv, "
                            f"webdataset .tar, or a folder holding one")


def read_records(data: str | Path, data_format: str = "auto") -> Records:
    """Read `data` with the reader for `data_format` ("auto": detect_format)."""
    if data_format == "auto":
        data_format, path = detect_format(data)
    elif data_format not in READERS:
        raise ValueError(f"data_format {data_format!r} is not one of {('auto',) + FORMATS}")
    else:
        path = Path(data)
        if data_format == "jsonl" and path.is_dir():
            path = path / "metadata.jsonl"
        elif data_format == "txt_pairs" and path.is_file():
            path = path.parent
    return READERS[data_format](path)


__all__ = ["FORMATS", "READERS", "Records", "detect_format", "read_csv", "read_fastvideo_json", "read_jsonl",
           "read_records", "read_txt_pairs", "read_webdataset", "source_of"]
