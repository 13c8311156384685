"""The one rule for where random numbers are drawn, shared by the autoencoder, the schedulers and the pipeline."""

from __future__ import annotations

import torch

# One generator for the whole batch, or one per image (row i of every draw comes from generator i), or None.
Generators = torch.Generator | list[torch.Generator] | None


def randn(
    shape: tuple[int, ...] | torch.Size,
    *,
    generator: Generators,
    device: torch.device | str,
    dtype: torch.dtype,
) -> torch.Tensor:
    """N(0, 1) noise of ``shape`` for a tensor on ``device``, drawn as diffusers' ``randn_tensor`` draws it.

    The draw happens on the generator's device, so a CPU generator gives the same numbers whichever device the model
    runs on, then moves to ``device``. Without a generator the draw is on ``device`` from its default generator. A
    generator on an accelerator can only serve tensors on that kind of device.

    A list of generators draws row i of ``shape[0]`` from generator i, each row on its own (so image i gets the
    numbers a batch of one would get from that generator); a list of one is that one generator, as in diffusers.
    """
    device = torch.device(device)
    if isinstance(generator, (list, tuple)) and len(generator) == 1:
        generator = generator[0]
    generators = list(generator) if isinstance(generator, (list, tuple)) else None
    if generators is not None and len(generators) < shape[0]:
        raise ValueError(f"generator: expected one generator per image, {shape[0]}, got a list of {len(generators)}")
    first = generators[0] if generators else generator
    draw_device = device
    if first is not None and first.device.type != device.type:
        if first.device.type != "cpu":
            raise ValueError(f"generator: cannot draw noise for a {device.type} tensor from a "
                             f"{first.device.type} generator; use a CPU generator or one on {device.type}")
        draw_device = torch.device("cpu")
    if generators is None:
        return torch.randn(shape, generator=generator, device=draw_device, dtype=dtype).to(device)
    row = (1, *shape[1:])
    rows = [torch.randn(row, generator=generators[i], device=draw_device, dtype=dtype) for i in range(shape[0])]
    return torch.cat(rows).to(device)
