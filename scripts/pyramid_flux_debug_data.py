"""Synthetic data in the layout Pyramid Flow's extraction tools write (raw latents .pt, text feature .pt, an
annotation jsonl), imported into fastpost shards for the tiny pyramid_flux debug flavor (4 latent channels, T5 width
16, CLIP width 8). For CPU runs of configs/pyramid_flux/lora_debug.yaml and scripts/pyramid_flux_train_check.py.

    python scripts/pyramid_flux_debug_data.py outputs/pyramid_flux_debug [n_videos]
"""

import json
import sys
from pathlib import Path

import torch

from fastpost.data.pyramid_import import import_upstream
from fastpost.models.pyramid_flux import LATENT_NORM


def write(root: Path, n: int = 16, frames: int = 4, size: int = 16, text_len: int = 8) -> Path:
    """n videos of 4 fixed random patterns (one caption each); returns the shard folder root/shards."""
    up = root / "upstream"
    (up / "lat").mkdir(parents=True, exist_ok=True)
    (up / "txt").mkdir(exist_ok=True)
    g = torch.Generator().manual_seed(0)
    patterns = [torch.randn(1, 4, frames, size, size, generator=g) * 2 - 0.2 for _ in range(4)]
    texts = [{"prompt_embed": torch.randn(1, text_len, 16, generator=g),
              "prompt_attention_mask": (torch.arange(text_len) < 3 + i).long()[None],
              "pooled_prompt_embed": torch.randn(1, 8, generator=g)} for i in range(5)]
    rows = []
    for i in range(n):
        torch.save(patterns[i % 4] + 0.05 * torch.randn(patterns[0].shape, generator=g), up / "lat" / f"{i}.pt")
        torch.save(texts[i % 4], up / "txt" / f"{i}.pt")
        rows.append({"video": f"{i}.mp4", "text": f"pattern {i % 4}", "latent": f"lat/{i}.pt", "text_fea": f"txt/{i}.pt"})
    (up / "anno.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    torch.save(texts[4], up / "empty.pt")
    import_upstream(up / "anno.jsonl", root / "shards", up / "empty.pt", LATENT_NORM, "pyramid_flux",
                    samples_per_shard=4, dtype="float32")
    return root / "shards"


if __name__ == "__main__":
    print(write(Path(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 16))
