"""Tuneforge: an OpenAI-compatible fine-tuning service.

Every process the service starts (API, worker, training child) imports this package first, so
the log filters for known, harmless library noise are installed here.
"""

from tuneforge import logfilters

logfilters.install()
