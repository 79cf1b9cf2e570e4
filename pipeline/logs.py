"""What the pipeline prints: one readable line per event, and TensorFlow's start-up chatter kept out.

The one place output is tuned. Importing this module (the CLI and the flows do
it before anything imports TensorFlow) sets TensorFlow's C++ log threshold,
which TensorFlow reads once, when it loads.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings

# C++ INFO and WARNING lines (CPU feature notices) say nothing a user can act on.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# MLflow registers its local-file dataset source under two schemes ("" and "file"), so every local
# split path is "ambiguous" although both candidates are the same class.
warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted in multiple ways")

# Keras' bundled tf2onnx probes `np.object`, which NumPy 2 warns about on every ONNX export.
warnings.filterwarnings("ignore", message="In the future `np.object` will be defined", category=FutureWarning)

# Libraries whose INFO records narrate their own internals (DVC: "Updating lock file", twice per stage).
QUIET_LOGGERS = ("great_expectations", "absl", "tensorflow", "h5py", "matplotlib", "PIL", "dvc", "tf2onnx")


def quiet_libraries() -> None:
    """Chatty libraries at WARNING, whoever formats the records (the CLI, or Prefect in a flow)."""
    for chatty in QUIET_LOGGERS:
        logging.getLogger(chatty).setLevel(logging.WARNING)


def configure_logging(level: int = logging.INFO) -> None:
    """Pipeline records as `LEVEL name: message` on stderr; chatty libraries at WARNING."""
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    quiet_libraries()
