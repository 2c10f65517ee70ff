"""``python -m benchmarks.kernels``: see the package docstring."""

from .cli import main

main()
