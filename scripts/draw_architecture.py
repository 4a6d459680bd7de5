"""Draw assets/architecture.png: the flow of a training job and of a sample (docs/architecture.md, DESIGN.md).

    python scripts/draw_architecture.py [--out assets/architecture.png]

Drawn from code so the figure changes with the text: edit TRAIN / SAMPLE below and rerun.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

# (title, detail, module) per stage, in flow order
TRAIN = [
    ("job file", "YAML + key=value\noverrides", "configs/"),
    ("config", "typed dataclasses,\nunknown keys raise", "config.py"),
    ("ParallelDims", "dp x sp meshes,\nbuilt once", "distributed/"),
    ("family", "model facts: classes,\nnoise, LoRA targets", "models/"),
    ("builder", "per declared model: meta\ninit > SP > AC > compile\n> FSDP > sharded load", "builder.py"),
    ("recipe.loss", "reads like\nthe equation", "recipes/"),
    ("trainer step", "accum, clip, non-finite\nskip, LR schedules", "trainer.py"),
    ("checkpoint / export", "DCP, atomic; validation;\nLoRA, merged pipeline", "checkpoint.py"),
]
SAMPLE = [
    ("prompt", "text, file\nor .jsonl", "sampling/"),
    ("text encoder", "the family's\n(T5)", "models/"),
    ("denoiser", "sampler + CFG strategy;\nSP model from the builder", "sampling/"),
    ("VAE decode", "the family's,\noptionally tiled", "models/"),
    ("writer", "mp4 + metadata\njson", "sampling/"),
]
TRAIN_COLOR, SAMPLE_COLOR, SHARED_COLOR = "#dbe9f6", "#e3f1dd", "#fbe5c8"


def _box(ax, x: float, y: float, w: float, h: float, stage: tuple[str, str, str], color: str) -> None:
    title, detail, module = stage
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.02,rounding_size=0.08", fc=color, ec="#445",
                                lw=1.0))
    ax.text(x + w / 2, y + h * 0.74, title, ha="center", va="center", fontsize=9, weight="bold")
    ax.text(x + w / 2, y + h * 0.40, detail, ha="center", va="center", fontsize=7, linespacing=1.1)
    ax.text(x + w / 2, y + h * 0.09, module, ha="center", va="center", fontsize=6.5, family="monospace",
            color="#334")


def _arrow(ax, start: tuple[float, float], end: tuple[float, float], **kw) -> None:
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=11, lw=1.1, color="#334", **kw))


def draw(out: Path) -> Path:
    w, h, gap = 1.55, 1.05, 0.3
    fig_w = len(TRAIN) * (w + gap) + 0.4
    fig, ax = plt.subplots(figsize=(fig_w, 4.1))
    ax.set_xlim(0, fig_w)
    ax.set_ylim(0, 4.1)
    ax.axis("off")

    y_train, y_sample = 2.45, 0.45
    ax.text(0.2, y_train + h + 0.3, "the flow of a training job", fontsize=10, style="italic")
    xs = [0.2 + i * (w + gap) for i in range(len(TRAIN))]
    for i, (x, stage) in enumerate(zip(xs, TRAIN)):
        _box(ax, x, y_train, w, h, stage, SHARED_COLOR if stage[0] in ("family", "builder") else TRAIN_COLOR)
        if i:
            _arrow(ax, (x - gap, y_train + h / 2), (x, y_train + h / 2))

    ax.text(0.2, y_sample + h + 0.3, "the flow of a sample", fontsize=10, style="italic")
    shift = xs[2]  # the sample row sits under the family and builder it shares with training
    sx = [shift + i * (w + gap) for i in range(len(SAMPLE))]
    for i, (x, stage) in enumerate(zip(sx, SAMPLE)):
        _box(ax, x, y_sample, w, h, stage, SAMPLE_COLOR)
        if i:
            _arrow(ax, (x - gap, y_sample + h / 2), (x, y_sample + h / 2))
    # shared pieces: the family supplies the encoder and VAE, the builder the SP model of the denoiser
    builder = xs[[s[0] for s in TRAIN].index("builder")]
    family = xs[[s[0] for s in TRAIN].index("family")]
    dashed = {"linestyle": (0, (3, 2))}
    _arrow(ax, (builder + w / 2, y_train), (sx[2] + w / 2, y_sample + h), **dashed)
    _arrow(ax, (family + w * 0.35, y_train), (sx[1] + w / 2, y_sample + h), **dashed)
    _arrow(ax, (family + w * 0.65, y_train), (sx[3] + w * 0.3, y_sample + h), connectionstyle="arc3,rad=-0.15",
           **dashed)
    ax.text(fig_w - 0.2, 0.1, "dashed: shared components (orange)", ha="right", fontsize=7, color="#445")
    fig.tight_layout(pad=0.2)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "assets" / "architecture.png"))
    print(draw(Path(p.parse_args().out)))


if __name__ == "__main__":
    main()
