"""medanomaly: find abnormal regions in medical images with U-Net networks."""

from medanomaly.errors import MedanomalyError

__version__ = "0.1.0"
__all__ = ["MedanomalyError", "__version__"]
