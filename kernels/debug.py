"""`HEADWISE_DEBUG=1`: every kernel op checks its inputs on every call.

Read once, at import. The test suite sets it (tests/conftest.py); serving leaves it off,
so a decode step does not run ~30 Python checks per op per layer. Unchecked bad inputs
fail inside the kernel or give wrong results: run with the flag to find which argument.
"""

from __future__ import annotations

import os

CHECKS: bool = os.environ.get("HEADWISE_DEBUG", "").strip() not in ("", "0")
