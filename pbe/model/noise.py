"""The one rule for where random numbers are drawn, shared by the autoencoder, the schedulers and the pipeline."""

from __future__ import annotations

import torch


def randn(
    shape: tuple[int, ...] | torch.Size,
    *,
    generator: torch.Generator | None,
    device: torch.device | str,
    dtype: torch.dtype,
) -> torch.Tensor:
    """N(0, 1) noise of ``shape`` for a tensor on ``device``, drawn as diffusers' ``randn_tensor`` draws it.

    The draw happens on the generator's device, so a CPU generator gives the same numbers whichever device the model
    runs on, then moves to ``device``. Without a generator the draw is on ``device`` from its default generator. A
    generator on an accelerator can only serve tensors on that kind of device.
    """
    device = torch.device(device)
    draw_device = device
    if generator is not None and generator.device.type != device.type:
        if generator.device.type != "cpu":
            raise ValueError(f"generator: cannot draw noise for a {device.type} tensor from a "
                             f"{generator.device.type} generator; use a CPU generator or one on {device.type}")
        draw_device = torch.device("cpu")
    return torch.randn(shape, generator=generator, device=draw_device, dtype=dtype).to(device)
