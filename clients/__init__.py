"""smartspec: goodput-driven speculative decoding for LLM serving.

The client SDK's public names live here (`from smartspec import Client`).
"""

__version__ = "0.1.0"
