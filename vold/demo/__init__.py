"""``vold demo``: a laptop-scale replication of VOLD's ablation on the CPU (see docs/demo.md).

- :mod:`vold.demo.task`: the toy task (arithmetic expressions, step-by-step solutions, bitmap rendering);
- :mod:`vold.demo.models`: the random tiny teacher (Qwen3) and student (Qwen2.5-VL), one tokenizer;
- :mod:`vold.demo.config`: settings, the ``--quick`` preset, cache keys;
- :mod:`vold.demo.pipeline`: the stages (``vold sft`` / ``make-traces`` / ``train`` / ``eval``) and their scheduler;
- :mod:`vold.demo.report`: the results table and the figures.
"""
