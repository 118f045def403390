"""The one thing setup.cfg cannot say. The repository keeps ``shards/``, ``recipes/``, ``launch/`` and ``slurm/`` at
the top level; the wheel installs them inside the package (``itr.shards``, and ``itr/_data/...`` for the files
``itr.resources`` finds), so that ``pip install itr`` ships them and installs no top-level ``shards`` package."""
from setuptools import find_packages, setup

BUNDLED = {"itr.shards": "shards", "itr._data.recipes": "recipes", "itr._data.launch": "launch",
           "itr._data.slurm": "slurm"}

setup(packages=find_packages(include=["itr", "itr.*"]) + sorted(BUNDLED), package_dir=BUNDLED)
