"""Benchmarks of mtl-plugins: cost of every strategy against its floor, scaling with the number of
tasks, and quality on the embedded benchmarks.

``python -m benchmarks.run`` regenerates ``docs/benchmarks/README.md`` and its plots; see
:mod:`benchmarks.run` for the options.
"""
