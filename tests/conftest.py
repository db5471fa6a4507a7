"""Shared test set-up.

Without CUDA, Triton's kernels (probmask.kernels.triton) can only run in Triton's interpreter,
on CPU tensors. Triton reads ``TRITON_INTERPRET`` when it is imported and when a kernel is
defined, and importing probmask imports Triton (through PyTorch), so the variable is set here,
before any test module is imported.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
