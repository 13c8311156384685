"""``python -m weights_convert SRC OUT.safetensors [--dtype fp32|bf16|fp16] [--config CONFIG.json]``

The same command as ``pbe convert`` (see ``weights_convert.command``).
"""

import sys

from .command import main

if __name__ == "__main__":
    sys.exit(main())
