"""itr: distributed training toolkit for image-text retrieval.

Data path: ``itr.shards`` (build) -> ``itr.data.loader`` (stream) -> batch.
Eval path: ``itr.eval.embed`` -> ``itr.eval.scores`` (tiled) -> ``itr.eval.ranks`` -> ``itr.eval.metrics``.
Training loop: ``itr.train`` (one file).
"""
__version__ = "0.1.0"


def _checkout_shards():
    """``itr.shards`` from a checkout, where ``shards/`` sits beside ``itr/`` (the wheel installs it as
    ``itr/shards``, setup.py's package_dir): registered here so that a plain ``PYTHONPATH=checkout`` works too."""
    import importlib.util
    import sys
    from pathlib import Path

    here = Path(__file__).resolve().parent
    src = here.parent / "shards" / "__init__.py"
    if (here / "shards").is_dir() or not src.is_file() or "itr.shards" in sys.modules:
        return
    spec = importlib.util.spec_from_file_location("itr.shards", src, submodule_search_locations=[str(src.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["itr.shards"] = module
    spec.loader.exec_module(module)
    setattr(sys.modules[__name__], "shards", module)  # what the import system does for a found submodule


_checkout_shards()
