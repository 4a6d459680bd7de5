"""Video sampling with Ulysses sequence parallelism and CFG parallelism; mp4 + metadata json per prompt.

    fastpost sample --config configs/cogvideox/sample_debug.yaml --prompt "a red ball"

The parts, lowest first (each imports only the ones above it, plus the family it is handed):
  writer.py    prompt lists, atomic mp4 / json / latent files, the progress bar, SampleError
  mesh.py      layout: world = replicas x cfg x ulysses, its ParallelDims and process groups
  samplers.py  the sampler plug-in interface + registry: ddim, dpm, flow_euler, phased (a distilled student)
  model.py     the family's transformer + trained weights (DCP checkpoint, LoRA via fastpost.lora) + SP
  prompts.py   prompt embeddings: rank 0 runs the family's text encoder and broadcasts
  denoiser.py  family.predict() in the pipeline layout with a CFG strategy (batched / sequential / cfg-parallel)
  sampler.py   VideoSampler (wires the above, VAE decode, metadata) and `main` (the CLI)
"""

from fastpost.sampling.denoiser import Denoiser, guidance_at
from fastpost.sampling.mesh import SamplingMesh
from fastpost.sampling.sampler import (Geometry, SampleConfig, SampleModelConfig, SampleParallelConfig, VideoSampler,
                                       check_parallel, main, parse_args, resolve_geometry)
from fastpost.sampling.samplers import (SAMPLERS, PhasedSampler, PhasedSamplerConfig, Sampler, SamplerContext,
                                        build_sampler, register_sampler)
from fastpost.sampling.writer import PromptItem, SampleError, read_prompts

__all__ = ["Denoiser", "Geometry", "PhasedSampler", "PhasedSamplerConfig", "PromptItem", "SAMPLERS", "SampleConfig",
           "SampleError", "SampleModelConfig", "SampleParallelConfig", "Sampler", "SamplerContext", "SamplingMesh",
           "VideoSampler", "build_sampler", "check_parallel", "guidance_at", "main", "parse_args", "read_prompts",
           "register_sampler", "resolve_geometry"]
