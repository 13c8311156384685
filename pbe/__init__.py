"""pbe: Paint by Example (exemplar-guided image inpainting) in pure PyTorch.

    from pbe import PaintByExample
    pipe = PaintByExample.from_pretrained("Fantasy-Studio/Paint-by-Example")
    painted = pipe(example_image, image, mask_image).images[0]   # white in the mask = repaint

``pbe.load(src)`` gives the three networks alone (``pbe.model`` holds their code).
"""

from .checkpoint import CheckpointError
from .loading import PaintByExampleNetworks, load
from .memory import reuse_freed_memory
from .pipeline import PaintByExample, PaintByExampleOutput

__version__ = "0.1.0"

__all__ = ["CheckpointError", "PaintByExample", "PaintByExampleNetworks", "PaintByExampleOutput", "__version__", "load",
           "reuse_freed_memory"]
