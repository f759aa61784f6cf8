"""The ``compressjax demo`` pipeline: MNIST-1D teacher, student, distillation, pruning + 4-bit QAT, export.

Submodules import their optional dependencies (``mnist1d``, ``rich``, ``matplotlib``) lazily, so
``import compressjax`` never needs the ``demo`` extra.
"""
