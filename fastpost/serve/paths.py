"""Files a request may name: LoRA folders and images, each confined to the folder the server was started with.

A request names a file by its path relative to that folder. Absolute names, `..` parts and symlinks that lead
outside are refused, so a page (or an API client) cannot make the server read any other file.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath

from fastpost.lora import LORA_FILE
from fastpost.sampling.writer import SampleError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def confined(root: str | Path | None, name: str, what: str) -> Path:
    """`root / name`, refused unless it stays inside `root` after resolving symlinks."""
    flag = {"LoRA": "--lora-dir", "image": "--image-dir"}.get(what, "its folder option")
    if root is None:
        raise SampleError(f"{what} {name!r}: this server has no {what} folder; start it with {flag} DIR")
    rel = PurePosixPath(name.replace("\\", "/"))
    if rel.is_absolute() or Path(name).is_absolute() or ".." in rel.parts:
        raise SampleError(f"{what} {name!r}: name a path inside the {what} folder (relative, no '..'); "
                          f"absolute paths and '..' are refused")
    base = Path(root).resolve()
    path = (base / rel).resolve()
    if not path.is_relative_to(base):
        raise SampleError(f"{what} {name!r} leads outside the {what} folder (a symlink?); refused")
    return path


def list_loras(root: str | Path | None) -> list[str]:
    """Folders under `root` (any depth) holding a diffusers-format LoRA file, relative to it, sorted."""
    if root is None or not Path(root).is_dir():
        return []
    base = Path(root)
    return sorted(str(p.parent.relative_to(base)) for p in base.rglob(LORA_FILE))


def list_images(root: str | Path | None) -> list[str]:
    if root is None or not Path(root).is_dir():
        return []
    base = Path(root)
    return sorted(str(p.relative_to(base)) for p in base.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
