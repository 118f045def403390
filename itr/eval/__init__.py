"""Evaluation path: embed.py -> scores.py (tiled) -> ranks.py (counting) -> metrics.py; job.py runs it."""
