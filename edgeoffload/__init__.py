"""edgeoffload: split models between a small device and a nearby edge server.

Importing this package is light (stdlib only); heavy modules are imported where used.
"""

from __future__ import annotations

__version__ = "0.1.0"

from edgeoffload.errors import EdgeOffloadError

__all__ = ["EdgeOffloadError", "__version__"]
