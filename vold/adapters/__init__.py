"""Adapters that put :func:`vold.kernels.vold_loss` into other trainers.

- :mod:`vold.adapters.trl`: ``VoldGRPOTrainer``, a drop-in ``trl.GRPOTrainer`` (needs ``pip install trl``).

Nothing is imported here, so ``import vold.adapters`` works without the optional dependencies.
"""
