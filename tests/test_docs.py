"""README and docs stay true: images they show exist (relative paths, as a code host renders them), the tests
the README cites exist, and the demo's built-in job files are the ones in configs/."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# ![alt](path), ![alt](<path with spaces> "title"), <img ... src="path">
IMAGE = re.compile(r"!\[[^\]]*\]\(\s*(?:<([^>]+)>|([^)\s]+))[^)]*\)|<img\s[^>]*src=\"([^\"]+)\"")


def _images(page: Path) -> list[str]:
    return ["".join(groups) for groups in IMAGE.findall(page.read_text())]


def test_every_image_link_points_to_an_existing_relative_file():
    seen = 0
    for page in PAGES:
        for link in _images(page):
            seen += 1
            where = f"{page.relative_to(ROOT)}: {link}"
            assert not re.match(r"^[a-z]+://|^/", link), f"{where} must be a relative path inside the repository"
            target = (page.parent / link.split("#")[0]).resolve()
            assert target.is_file(), f"{where} does not exist"
            assert ROOT in target.parents, f"{where} points outside the repository"
    assert seen >= 1  # the README shows at least one picture


def test_assets_are_small_pngs():
    pngs = sorted((ROOT / "assets").glob("*.png"))
    assert {p.name for p in pngs} >= {"architecture.png", "loss_curve.png", "before_after.png"}
    for p in pngs:
        assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", p.name
        assert p.stat().st_size < 300_000, (p.name, p.stat().st_size)


def test_tests_cited_in_the_readme_exist():
    # table cells read [test_name](tests/test_file.py) or [test_name[param]](tests/test_file.py)
    cited = re.findall(r"\[`?(test_\w+)(?:\[[^\]]*\])?`?\]\((tests/test_\w+\.py)\)", (ROOT / "README.md").read_text())
    assert len(cited) >= 8
    for name, path in cited:
        assert re.search(rf"^def {name}\(", (ROOT / path).read_text(), re.M), f"README cites {path}::{name}"


@pytest.mark.parametrize("kind,config", [("preprocess", "preprocess_debug"), ("train", "lora_debug"),
                                         ("sample", "sample_debug")])
def test_demo_jobs_are_the_configs_files(kind, config):
    from fastpost.cli import _job_class
    from fastpost.config import from_dict, load_config
    from fastpost.demo import jobs

    built = from_dict(_job_class(kind), jobs(Path("outputs/demo"))[kind])
    assert built == load_config(_job_class(kind), ROOT / "configs" / "cogvideox" / f"{config}.yaml")
