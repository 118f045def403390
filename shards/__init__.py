"""Building WebDataset shards from the research formats (``itr shard ...``).

- ``itr.shards.precomp``: the SCAN precomp layout (``{split}_ims.npy`` + ``{split}_caps.txt``).

The reading side (manifest checks, the training stream) lives in ``itr.data``.
"""
