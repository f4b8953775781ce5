"""HTTP serving for UltraFastBERT: router (``app``), settings, schemas, errors and metrics.

The queue and batching live in ``engine.batcher`` and the model in ``engine``; this package only translates
HTTP into batcher calls and back, which keeps the engine usable without a web stack.
"""

__version__ = "0.1.0"
