"""Pure compute: inference backends and the pre/post-processing shared by all of them.

Nothing here imports Ray: every piece runs (and is tested) in a plain process.
"""

from engines.base import Completed, Engine, EngineError, Pending, RunTiming, TensorSpec, completed
from engines.detections import Classifications, Detections
from engines.factory import create_engine

__all__ = [
    "Classifications",
    "Completed",
    "Pending",
    "RunTiming",
    "completed",
    "Detections",
    "Engine",
    "EngineError",
    "TensorSpec",
    "create_engine",
]
