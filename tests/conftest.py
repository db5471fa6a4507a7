"""Shared test set-up.

Without CUDA, Triton's kernels (probmask.kernels.triton) can only run in Triton's interpreter,
on CPU tensors. Triton reads ``TRITON_INTERPRET`` when it is imported and when a kernel is
defined, and importing probmask imports Triton (through PyTorch), so the variable is set here,
before any test module is imported.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a test module's own work: small networks run fastest on one, and far
    faster than on two on a busy 2-core machine (the runner's runs use one thread by default)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
