"""`fastpost` as a new user meets it: top-level help and version, per-command help with job-file keys,
`fastpost config show`. Run as subprocesses, exactly as the console script runs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def fastpost(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "fastpost.cli", *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_top_level_help_lists_every_command_and_exits_0():
    from fastpost.cli import COMMANDS

    for flag in ("--help", "-h"):
        r = fastpost(flag)
        assert r.returncode == 0, r.stderr
        for name, (_, purpose) in COMMANDS.items():
            assert re.search(rf"^  {re.escape(name)} +{re.escape(purpose)}$", r.stdout, re.M), name


def test_version_is_the_package_version():
    version = re.search(r'version="([^"]+)"', (ROOT / "setup.py").read_text()).group(1)
    r = fastpost("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"fastpost {version}"


def test_missing_or_unknown_command_exits_2_with_one_error_line():
    for args, problem in (((), "no command given"), (("trian",), "unknown command 'trian'")):
        r = fastpost(*args)
        assert r.returncode == 2
        assert r.stderr.strip().splitlines()[-1] == f"fastpost: error: {problem}"
        assert "commands:" in r.stderr


def _assert_lists_keys(text: str, cls, prefix: str = "") -> None:
    from fastpost.config import describe

    rows = describe(cls, prefix=prefix)
    assert rows
    for key, tp, default, comment in rows:
        line = next((ln for ln in text.splitlines() if ln.split()[:1] == [key]), None)
        assert line is not None, f"{key} missing from the help"
        assert tp in line and default in line, line
        if comment:
            assert line.endswith("# " + comment), line


def test_train_help_lists_options_and_every_job_key_with_type_default_and_comment():
    from fastpost.recipes import get_recipe
    from fastpost.trainer import TrainConfig

    r = fastpost("train", "--help")
    assert r.returncode == 0, r.stderr
    assert "--resume RESUME" in r.stdout
    _assert_lists_keys(r.stdout, TrainConfig)
    for recipe in ("finetune", "distill", "pyramid_flow"):
        title = f"recipe_args keys with recipe: {recipe}\n"
        assert title in r.stdout
        section = r.stdout.split(title, 1)[1].split("\n\n", 1)[0]  # recipes share key names: look in its own
        _assert_lists_keys(section, get_recipe(recipe).Config, prefix="recipe_args.")
    # spot-check the rendering of one row against the source line `grad_clip: float = 1.0  # max global ...`
    assert re.search(r"^  optim\.grad_clip +float +1\.0 +# max global grad norm; 0 disables clipping", r.stdout, re.M)
    assert re.search(r'^  data\.path +str +"" +# folder holding manifest\.jsonl', r.stdout, re.M)


def test_sample_and_preprocess_help_list_their_job_keys():
    from fastpost.data.preprocess import PreprocessConfig
    from fastpost.sampling import SampleConfig

    r = fastpost("sample", "--help")
    assert r.returncode == 0, r.stderr
    assert "--prompt PROMPT" in r.stdout
    _assert_lists_keys(r.stdout, SampleConfig)
    r = fastpost("preprocess", "-h")
    assert r.returncode == 0, r.stderr
    _assert_lists_keys(r.stdout, PreprocessConfig)
    assert re.search(r"^  data +str +\(required\)", r.stdout, re.M)


def test_config_show_prints_the_resolved_job_for_each_kind(tmp_path):
    from fastpost.config import load_config, plain
    from fastpost.data.preprocess import PreprocessConfig
    from fastpost.recipes.finetune import FinetuneConfig
    from fastpost.sampling import SampleConfig
    from fastpost.trainer import TrainConfig

    r = fastpost("config", "show", "--config", "configs/cogvideox/lora_debug.yaml", "optim.lr=3e-4",
                 "recipe_args.flow_shift=2.0", cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("# fastpost train job (inferred from the keys)")
    job = yaml.safe_load(r.stdout)
    want = plain(load_config(TrainConfig, ROOT / "configs/cogvideox/lora_debug.yaml",
                             ["optim.lr=3e-4", "recipe_args.flow_shift=2.0"]))
    want["recipe_args"] = plain(FinetuneConfig(flow_shift=2.0))  # every recipe default filled in
    assert job == want and job["optim"]["lr"] == 3e-4

    # the other kinds in process (the same code path; a subprocess costs seconds of imports)
    from fastpost.cli import resolve_job

    for path, kind, cls in (("configs/cogvideox/sample_debug.yaml", "sample", SampleConfig),
                            ("configs/cogvideox/preprocess_debug.yaml", "preprocess", PreprocessConfig)):
        assert resolve_job(str(ROOT / path), []) == (kind, plain(load_config(cls, ROOT / path)))

    # a preprocess section inside a job file, and an explicit --kind
    (tmp_path / "job.yaml").write_text("preprocess: {data: d, output_dir: o, vae: v, text_encoder: t}\n")
    r = fastpost("config", "show", "--config", str(tmp_path / "job.yaml"), "--kind", "preprocess", "limit=3")
    assert r.returncode == 0, r.stderr
    got = yaml.safe_load(r.stdout)
    assert got["data"] == "d" and got["limit"] == 3 and got["max_frames"] == 25


def test_config_show_bad_job_is_one_error_line_exit_2():
    r = fastpost("config", "show", "--config", "configs/cogvideox/sample_debug.yaml", "--kind", "train")
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1
    assert r.stderr.startswith("fastpost config: error: unknown config key(s)") and "'prompt'" in r.stderr


# ---- the renderer, in process -------------------------------------------------------------------------------------
@dataclass
class _Inner:
    size: tuple[int, int] = (4, 8)  # height, width


@dataclass
class _Documented:
    name: str  # who
    rate: float = 1e-3  # step size;
    #                     continued here
    # about the next field, from above
    mode: str | None = None
    flags: list[str] = field(default_factory=lambda: ["a"])  # list default
    inner: _Inner = field(default_factory=lambda: _Inner(size=(2, 2)))


def test_describe_reads_types_defaults_and_source_comments():
    from fastpost.config import describe, field_comments

    assert field_comments(_Documented) == {"name": "who", "rate": "step size; continued here",
                                           "mode": "about the next field, from above", "flags": "list default"}
    assert describe(_Documented) == [
        ("name", "str", "(required)", "who"),
        ("rate", "float", "0.001", "step size; continued here"),
        ("mode", "str | None", "null", "about the next field, from above"),
        ("flags", "list[str]", '["a"]', "list default"),
        ("inner.size", "tuple[int, int]", "[2, 2]", "height, width"),  # the parent's factory sets the default
    ]


@pytest.mark.parametrize("data,kind", [({"steps": 3, "optim": {}}, "train"), ({"prompt": "x"}, "sample"),
                                       ({"vae": "v", "limit": 2}, "preprocess"), ({"seed": 1}, "train")])
def test_infer_kind_from_keys(data, kind):
    from fastpost.cli import infer_kind

    assert infer_kind(data) == kind
