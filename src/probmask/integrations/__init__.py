"""ProbMask in other people's training loops.

- :mod:`probmask.integrations.transformers`: ``ProbMaskCallback`` for Hugging Face's ``Trainer``
  (``pip install "probmask[transformers]"``);
- :mod:`probmask.integrations.lightning`: ``ProbMaskCallback`` for ``lightning.Trainer``
  (``pip install "probmask[lightning]"``);
- :mod:`probmask.integrations.driver`: the framework-free :class:`StepDriver` both are built on,
  for any loop that can call it once per optimizer step.

Importing this package imports neither framework; each submodule imports its own.
"""
