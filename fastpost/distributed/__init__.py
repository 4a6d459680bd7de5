from fastpost.distributed.parallel_dims import ParallelDims, default_device_type, init_distributed

__all__ = ["ParallelDims", "default_device_type", "init_distributed"]
