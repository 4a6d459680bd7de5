#!/usr/bin/env python
"""Generate the synthetic captioned video set used by the demo and tests.

    python scripts/make_synthetic_videos.py out_dir=outputs/synth num_videos=16 num_images=4 'sizes=[[64,64],[48,80]]'
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a fresh checkout without install

from fastpost.data.synthetic import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
