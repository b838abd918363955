"""Data: from a configured source to the splits training reads, layered bottom-up; a
module imports only from the layers below it.

1. ``base``: the columns the pipeline adds, ``TargetSpec``, ``ModelInputs``, the
   ``Features`` and ``Preprocessor`` protocols and their registries; ``columns``:
   parsing and reject helpers every kind shares.
2. One module per kind of data, each registering its two halves: ``images``,
   ``tabular``, ``text``, ``series``.
3. ``kinds`` (every kind imported; lookups by kind), ``readers`` (data files),
   ``builtin`` (built-in datasets; ``wafer`` and ``dates`` generate two of them).
4. ``sources``: ``data.source`` to files and their features.
5. ``split``, ``shards`` and ``pipeline``: the splits, fitted and dealt to workers.
"""
