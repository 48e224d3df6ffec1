"""medanomaly: find abnormal regions in medical images with U-Net networks.

The code is laid out by pipeline stage, one sub-package each (README, "How the code is laid out"):
io -> data -> models -> anomaly / postprocess -> infer -> train -> calibrate -> evaluate -> apps,
with config and core beneath them all.
"""

from medanomaly.core.errors import MedanomalyError
from medanomaly.core.version import __version__

__all__ = ["MedanomalyError", "__version__"]
