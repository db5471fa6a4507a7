"""The fused kernels of the relaxed mask and of the projection."""
