"""Copy the demo's images from a finished `make demo` run into assets/ (what README and docs show).

    make demo && python scripts/refresh_assets.py [--workdir outputs/demo]

Redraws assets/architecture.png too. Each image must stay under 300 KB: they live in git.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO_IMAGES = ("loss_curve.png", "before_after.png")  # written by fastpost/demo.py
MAX_BYTES = 300_000


def refresh(workdir: Path, assets: Path) -> list[Path]:
    missing = [name for name in DEMO_IMAGES if not (workdir / name).is_file()]
    if missing:
        raise SystemExit(f"refresh_assets: {missing} not in {workdir}; run `make demo` first (or pass --workdir)")
    sys.path.insert(0, str(ROOT / "scripts"))
    from draw_architecture import draw

    assets.mkdir(exist_ok=True)
    written = [draw(assets / "architecture.png")]
    for name in DEMO_IMAGES:
        written.append(Path(shutil.copyfile(workdir / name, assets / name)))
    too_big = [f"{p.name} ({p.stat().st_size // 1000} KB)" for p in written if p.stat().st_size > MAX_BYTES]
    if too_big:
        raise SystemExit(f"refresh_assets: {too_big} over {MAX_BYTES // 1000} KB; lower the dpi where it is drawn")
    return written


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default=str(ROOT / "outputs" / "demo"), help="the demo's --workdir")
    args = p.parse_args()
    for path in refresh(Path(args.workdir), ROOT / "assets"):
        print(f"{path.relative_to(ROOT)}  {path.stat().st_size // 1000} KB")


if __name__ == "__main__":
    main()
