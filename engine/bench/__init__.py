"""The speed benchmark (``python -m engine.bench``, ``make bench``): the CMM kernel against dense and reference
feedforwards, and the whole encoder, side by side in one process (suite.py). Serving never imports it."""
