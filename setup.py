from setuptools import find_packages, setup

setup(
    name="fastpost",
    version="0.1.0",
    description="Post-training (finetune, distillation) and sequence-parallel sampling for video diffusion transformers",
    packages=find_packages(include=["fastpost", "fastpost.*"]),
    python_requires=">=3.10",
    # torch is pinned to 2.13.0 by the Makefile on CPU machines; any >=2.6 with FSDP2 + DTensor works.
    install_requires=[
        "torch>=2.6",
        "diffusers>=0.32",
        "transformers>=4.44",
        "peft>=0.13",
        "safetensors>=0.4",
        "huggingface_hub>=0.24",
        "einops>=0.7",
        "imageio>=2.34",
        "imageio-ffmpeg>=0.5",
        "pyyaml>=6",
        "tokenizers>=0.19",
        "sentencepiece",
        "matplotlib>=3.7",
        "ftfy",  # diffusers' Wan pipelines clean prompts with it (fastpost.models.wan uses the same cleaning)
    ],
    extras_require={
        "dev": ["pytest>=8", "pytest-xdist>=3", "prodigyopt>=1.1", "tensorboard>=2.14"],  # tensorboard: the validation test reads its event file
        # `fastpost serve`: the page (rank 0) and its API client (tests/test_serve.py)
        "serve": ["gradio>=5", "gradio_client>=1"],
        # the real-browser test of the page (`make test-browser`; Chromium itself comes from the OS)
        "browser": ["selenium>=4.10"],
        "prodigy": ["prodigyopt>=1.1"],  # optim.name: prodigy
        # Needs CUDA to build; never installed on CPU machines. fastpost imports it optionally.
        "flash": ["flash-attn>=2.6"],
    },
    entry_points={"console_scripts": ["fastpost=fastpost.cli:main"]},
)
