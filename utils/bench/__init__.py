"""Benchmarks behind ``benchmark.py``: input pipeline (data), training step (train), inference variants (infer)
and the frozen fine-tune feature pass (features). Each module has ``add_arguments(parser)`` and ``run(args)``."""
