"""Load tests for UltraFastBERT Serve: ``python -m loadtest`` (aiohttp + asyncio) and ``locustfile.py``."""

from loadtest.corpus import SENTENCES, TextMix
from loadtest.runner import Report, Workload, closed_loop, open_loop

__all__ = ["SENTENCES", "TextMix", "Report", "Workload", "closed_loop", "open_loop"]
