"""weights_convert: the two official Paint by Example checkpoint layouts -> pbe's own names, every key checked.

Depends on ``pbe.model`` (the networks), ``pbe.errors`` and ``pbe.checkpoint`` (pbe's file format, the safetensors
reader) only; pbe reaches it from ``pbe.loading`` (and ``pbe convert`` runs ``weights_convert.command``).
"""
