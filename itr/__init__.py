"""itr: distributed training toolkit for image-text retrieval.

Data path: ``shards/`` (build) -> ``itr.data.loader`` (stream) -> batch.
Eval path: ``itr.eval.embed`` -> ``itr.eval.scores`` (tiled) -> ``itr.eval.ranks`` -> ``itr.eval.metrics``.
Training loop: ``itr.train`` (one file).
"""
__version__ = "0.1.0"
