"""pbe: Paint by Example (exemplar-guided image inpainting) in pure PyTorch."""

from .checkpoint import CheckpointError
from .loading import PaintByExampleNetworks, load

__version__ = "0.1.0"

__all__ = ["CheckpointError", "PaintByExampleNetworks", "__version__", "load"]
