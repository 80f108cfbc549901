"""cafs: a content-addressed, FUSE-mounted filesystem for training datasets.

Layers (each imports only the ones below it): ``format`` and ``ids`` (byte layouts),
``chunking``, ``stores`` (moving bytes), ``repository`` (packs, index, refs),
``importer`` / ``extract`` / ``snapshot`` (trees), ``cli`` (the command edge).
"""

__version__ = "0.1.0"
