"""What the pipeline prints: one readable line per event, and TensorFlow's start-up chatter kept out.

The one place output is tuned. Importing this module (the CLI and the flows do
it before anything imports TensorFlow) sets TensorFlow's C++ log threshold,
which TensorFlow reads once, when it loads.
"""

from __future__ import annotations

import logging
import os
import sys

# C++ INFO and WARNING lines (CPU feature notices, oneDNN banners) say nothing a user can act on.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# Libraries whose INFO records narrate their own internals.
QUIET_LOGGERS = ("great_expectations", "absl", "tensorflow", "h5py", "matplotlib", "PIL")


def configure_logging(level: int = logging.INFO) -> None:
    """Pipeline records as `LEVEL name: message` on stderr; chatty libraries at WARNING."""
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for chatty in QUIET_LOGGERS:
        logging.getLogger(chatty).setLevel(logging.WARNING)
