"""Benchmarks of vold (not shipped with the package).

- ``python -m benchmarks.kernels``: time and peak memory of the fused GRPO + distillation loss against
  a naive PyTorch baseline, TRL's chunked kernels, Liger-Kernel and the GEMM floor (the package
  ``benchmarks/kernels/``).
- ``python -m benchmarks.step`` (``vold bench step``): tokens/s of one full trainer step and its time per
  phase (generation, reward, teacher, old/ref log-probs, update), from ``vold.rl.train_rl``'s own timings.
- ``benchmarks/harness.py``: what they share (timing, CPU monitor, child-process peak memory, machine
  description, JSON + markdown writing).
- ``python -m pytest benchmarks -q``: small pytest-benchmark cases plus sanity checks of the harness.
"""
