"""
ILM's benchmarks.  ``python -m benchmarks`` runs every scenario side by side
(see :mod:`benchmarks.run`); the older scripts in this directory still run
on their own (``python benchmarks/stream_network.py`` and so on).
"""
