"""Sample videos: the same as `fastpost sample` (works under torchrun).

    python scripts/sample.py --config configs/cogvideox/sample_debug.yaml --prompt "a red ball"
    torchrun --standalone --nproc_per_node=4 scripts/sample.py --config ... parallel.ulysses=2 parallel.cfg=2
"""

from fastpost.sampling import main

if __name__ == "__main__":
    raise SystemExit(main())
