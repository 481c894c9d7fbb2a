"""The fine-tuning cost calculator and method advisor.

`estimate(EstimateRequest) -> EstimateResponse`; torch, transformers and PEFT are imported on the
first estimate, not on import of this package.
"""

from tuneforge.estimates.calculator import estimate
from tuneforge.estimates.schema import (
    EstimateError,
    EstimateRequest,
    EstimateResponse,
    FileStats,
    Hardware,
)

__all__ = ["EstimateError", "EstimateRequest", "EstimateResponse", "FileStats", "Hardware", "estimate"]
