"""On every device but the CPU, each matmul, convolution, normalisation and attention op sees ONE floating dtype.

CUDA's layer_norm/group_norm kernels refuse float32 weights with half-precision activations ("expected scalar type
Half but found Float", pytorch/pytorch#135969), and diffusers' networks never mix dtypes in such an op. The CPU may
(``pbe.model.layers.norm_affine``: float32 norm weights there are fast and give the same bits). The ``meta`` device
stands in for the GPU: it runs no kernels and checks no dtypes, so a ``TorchDispatchMode`` hook does the checking,
on the three official-size networks (meta tensors have no storage: no memory, no weights needed).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from pbe.model import AutoencoderKL, ImageEncoder, UNet, UNetConfig

# The ops a GPU kernel would see, by ATen name (what the dispatcher reaches after linear, conv2d, group_norm,
# layer_norm and scaled_dot_product_attention decompose), grouped into the families every network must show.
MATMULS = {"mm", "bmm", "addmm", "baddbmm", "addbmm", "matmul", "linear", "mv", "addmv"}
FAMILIES = {"matmul": lambda name: name in MATMULS,
            "convolution": lambda name: "conv" in name,
            "normalisation": lambda name: "norm" in name,
            "attention": lambda name: "attention" in name or "softmax" in name}


class MixedDtypeRecorder(TorchDispatchMode):
    """Records every matmul/convolution/normalisation/attention call whose floating tensor inputs mix dtypes."""

    def __init__(self) -> None:
        super().__init__()
        self.families_seen: set[str] = set()
        self.mixed: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 (torch's signature)
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        families = {family for family, matches in FAMILIES.items() if matches(name)}
        if families:
            self.families_seen |= families
            dtypes = {t.dtype for t in pytree.tree_leaves((args, kwargs))
                      if isinstance(t, torch.Tensor) and t.is_floating_point()}
            if len(dtypes) > 1:
                self.mixed.append(f"{func}: {sorted(str(d) for d in dtypes)}")
        return func(*args, **kwargs)


def _run(network: str, dtype: torch.dtype, device: str) -> MixedDtypeRecorder:
    """One forward of the official-size ``network`` on ``device`` in ``dtype``, under the recorder."""
    with torch.device(device):
        model = {"unet": UNet, "vae": AutoencoderKL, "image_encoder": ImageEncoder}[network]().to(dtype)
    randn = lambda *shape: torch.randn(*shape, device=device, dtype=dtype)  # noqa: E731
    recorder = MixedDtypeRecorder()
    with torch.no_grad(), recorder:
        if network == "unet":
            model(randn(1, 9, 64, 64), 10, randn(2, 1, 768))  # a guided call: one sample, [uncond, cond] contexts
            model(randn(2, 9, 64, 64), torch.tensor([10, 20]), randn(2, 3, 768))  # full cross-attention (3 tokens)
        elif network == "vae":
            model.decode(model.encode(randn(1, 3, 512, 512)).mean)
        else:
            model(randn(1, 3, 224, 224))
    return recorder


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
@pytest.mark.parametrize("network", ["unet", "vae", "image_encoder"])
def test_one_dtype_per_op_off_the_cpu(network: str, dtype: torch.dtype) -> None:
    recorder = _run(network, dtype, "meta")
    assert recorder.families_seen == set(FAMILIES), "the hook did not see the network's ops"
    assert not recorder.mixed, f"{len(recorder.mixed)} mixed-dtype ops, first: {recorder.mixed[:3]}"


@torch.no_grad()
def test_the_hook_flags_mixed_dtypes() -> None:
    """The check above can fail: a norm given float32 weights with half activations on meta is flagged."""
    x = torch.randn(2, 8, 4, 4, device="meta", dtype=torch.float16)
    weight = torch.ones(8, device="meta")
    with MixedDtypeRecorder() as recorder:
        F.group_norm(x, 4, weight, weight)
        F.layer_norm(x, (4,), weight[:4], weight[:4])
        F.group_norm(x, 4, weight.half(), weight.half())  # one dtype: not flagged
    assert len(recorder.mixed) == 2, recorder.mixed


@torch.no_grad()
def test_the_cpu_keeps_float32_norm_weights() -> None:
    """On the CPU the norms keep float32 weights with bfloat16 activations (fast, same bits); the hook flags them."""
    config = UNetConfig(channels=(8, 16), cross_attention=(True, False), heads=2, context_dim=24, norm_groups=4)
    model = UNet(config).to(torch.bfloat16)
    with MixedDtypeRecorder() as recorder:
        model(torch.randn(1, 9, 8, 8, dtype=torch.bfloat16), 10, torch.randn(2, 1, 24, dtype=torch.bfloat16))
    assert recorder.mixed and all("norm" in call for call in recorder.mixed), recorder.mixed
