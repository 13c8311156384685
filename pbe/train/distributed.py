"""Training on many processes: torchrun's ranks, DDP / FSDP2 wrapping, and checkpoints a killed run resumes from.

``torchrun --nproc_per_node N -m pbe train ...`` starts N processes and sets RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR and MASTER_PORT (accelerate and Slurm wrappers set the same). ``setup`` reads them, puts each rank on
its own GPU (cuda:LOCAL_RANK) or on the CPU, and joins the process group (nccl on CUDA, gloo on the CPU)::

    dist = setup()                                   # Dist(rank, world_size, local_rank, device)
    trained = wrap(trained, strategy="auto", dist=dist)  # before the optimizer is built (FSDP2 swaps the parameters)
    optimizer = torch.optim.AdamW(trained.parameters(), lr=1e-5, weight_decay=0.01)
    if (folder := latest_checkpoint(out)) is not None:
        extra = load_training_state(folder, model=trained, optimizer=optimizer)   # then restore_rng_states(...)
    with no_sync(trained):                           # gradient accumulation: every micro-batch but the last
        ...
    log(all_reduce_mean(loss, dist))
    save_training_state(checkpoint_folder(out, step), model=trained, optimizer=optimizer,
                        extra={"step": step, "scheduler": scheduler.state_dict(), "rng": rng_states(), ...})
    weights = full_state_dict(trained)               # on rank 0: the plain module's tensors, for pbe's native file
    teardown(dist)

What is wrapped: only the trained module, one container holding the UNet and the image encoder's trained parts
(mapper, final LayerNorm, projection, unconditional token), whose ``forward`` computes the noise prediction from the
(frozen) CLIP class token. The frozen CLIP tower and autoencoder run beside it unwrapped: DDP then synchronises and
FSDP2 shards trained parameters only. ``wrap`` shards FSDP2 per UNet block (every res block, transformer and resampler,
and every transformer layer of the mapper), then the root.

Checkpoints are folders ``OUTPUT_DIR/checkpoints/step-000120`` written by ``torch.distributed.checkpoint``: every rank
writes its own shards, and a checkpoint written by N ranks loads into any number of ranks, one plain process
included. The model and optimizer go through ``torch.distributed.checkpoint.state_dict``, so plain, DDP and FSDP2
modules save the same parameter names. Beside them every rank keeps its own ``extra`` (step, LR-schedule state, its
RNG states, the data position). A save is written into ``.step-000120.pbe-partial`` and renamed by rank 0 once every
rank is done, so a run killed mid-save leaves the previous checkpoint as the latest one.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import warnings
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as torch_dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.nn.parallel import DistributedDataParallel

from ..devices import rank_device, ranks_from_environment, resolve_device
from ..files import PARTIAL_MARK
from ..model.layers import Downsample, ResBlock, TransformerLayer, Upsample
from ..model.unet import SpatialTransformer

STRATEGIES = ("auto", "none", "ddp", "fsdp")  # "auto": ddp with several ranks, none with one
# The FSDP2 units: each is gathered for its own forward and backward only, so a rank holds one block's full weights
# at a time beside its shards of everything else.
SHARD_UNITS = (ResBlock, SpatialTransformer, Downsample, Upsample, TransformerLayer)
CHECKPOINTS = "checkpoints"  # the folder of OUTPUT_DIR that holds the step folders
STEP_FOLDER = re.compile(r"step-(\d+)")
METADATA = ".metadata"  # torch.distributed.checkpoint's index, written once every rank's shards are written
EXTRA_ALLOWED = (torch.Tensor, int, float, bool, str, bytes, type(None))  # what torch.load(weights_only=True) reads


@dataclass(frozen=True)
class Dist:
    """This process's place in the run and the device it trains on."""

    rank: int  # global rank, 0 .. world_size - 1; rank 0 logs, validates and renames checkpoints
    world_size: int  # processes over all machines
    local_rank: int  # rank on this machine
    device: torch.device  # cuda:local_rank with CUDA, else the CPU

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0, the one that logs and writes what is written once."""
        return self.rank == 0


# --------------------------------------------------------------------------------------------------------------------
# Joining and leaving the run
# --------------------------------------------------------------------------------------------------------------------


def setup(device: str = "auto") -> Dist:
    """Read torchrun's RANK, WORLD_SIZE and LOCAL_RANK, choose this rank's device and, with several ranks, join the
    process group (nccl on CUDA, gloo on the CPU; an existing group of the same ranks is kept).

    ``device``: ``auto`` (cuda:LOCAL_RANK with CUDA, else the CPU; mps for a single process on a Mac), ``cuda``
    (cuda:LOCAL_RANK), ``cuda:N`` or ``cpu``. Without the variables: one process, ``Dist(0, 1, 0, device)``.

    Raises:
        ValueError: RANK without WORLD_SIZE (or the reverse), values out of range, MASTER_ADDR / MASTER_PORT missing
            with several ranks, a CUDA device this machine does not have, or a device no process group serves.
    """
    ranks = ranks_from_environment()
    chosen = _rank_device(device, ranks.rank, ranks.local_rank, ranks.world_size)
    if ranks.world_size == 1:
        return Dist(0, 1, 0, chosen)
    if not torch_dist.is_available():
        raise RuntimeError(f"WORLD_SIZE={ranks.world_size}: this PyTorch build has no torch.distributed")
    if torch_dist.is_initialized():
        joined = (torch_dist.get_rank(), torch_dist.get_world_size())
        if joined != (ranks.rank, ranks.world_size):
            raise ValueError(f"a process group of rank {joined[0]} of {joined[1]} exists, but the environment says "
                             f"RANK={ranks.rank}, WORLD_SIZE={ranks.world_size}")
        return Dist(ranks.rank, ranks.world_size, ranks.local_rank, chosen)
    missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if name not in os.environ]
    if missing:
        raise ValueError(f"WORLD_SIZE={ranks.world_size} but {' and '.join(missing)} not set: launch with "
                         "torchrun --nproc_per_node N -m pbe train ..., which sets them")
    if chosen.type == "cuda":
        torch.cuda.set_device(chosen)
        torch_dist.init_process_group("nccl", rank=ranks.rank, world_size=ranks.world_size, device_id=chosen)
    else:
        torch_dist.init_process_group("gloo", rank=ranks.rank, world_size=ranks.world_size)
    return Dist(ranks.rank, ranks.world_size, ranks.local_rank, chosen)


def _rank_device(device: str, rank: int, local_rank: int, world_size: int) -> torch.device:
    resolved = resolve_device(rank_device(device, local_rank))
    if resolved.type == "cuda":
        count = torch.cuda.device_count()
        index = local_rank if resolved.index is None else resolved.index
        if count == 0:
            raise ValueError(f"device {device!r}: PyTorch sees no CUDA GPU here (torch {torch.__version__}); "
                             "use device 'auto' or 'cpu'")
        if index >= count:
            raise ValueError(f"device {device!r}: rank {rank} (LOCAL_RANK={local_rank}) would train on cuda:{index}, "
                             f"but PyTorch sees {count} CUDA GPU(s) here; start at most one process per GPU")
        return torch.device("cuda", index)
    if world_size > 1 and resolved.type != "cpu":
        if device == "auto":
            return torch.device("cpu")  # no process-group backend serves Apple GPUs
        raise ValueError(f"device {device!r}: several ranks train on CUDA (nccl) or the CPU (gloo), "
                         f"not on {resolved.type}")
    return resolved


def teardown(dist: Dist) -> None:
    """Leave the process group ``setup`` joined (nothing to do for one process)."""
    if dist.world_size > 1 and torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def all_reduce_mean(value: torch.Tensor, dist: Dist) -> torch.Tensor:
    """The mean of ``value`` over all ranks (a detached copy on ``value``'s device), for logging: every rank must call
    it. Integer tensors are averaged in float32."""
    dtype = value.dtype if value.is_floating_point() else torch.float32
    mean = value.detach().to(dtype=dtype).clone()
    if dist.world_size == 1:
        return mean
    # nccl reduces GPU tensors only, gloo CPU tensors only: the rank's own device serves both.
    on_device = mean.to(dist.device)
    torch_dist.all_reduce(on_device, op=torch_dist.ReduceOp.SUM)
    return (on_device / dist.world_size).to(value.device)


# --------------------------------------------------------------------------------------------------------------------
# Wrapping the trained module
# --------------------------------------------------------------------------------------------------------------------


def resolve_strategy(strategy: str, dist: Dist) -> str:
    """``auto`` -> ``ddp`` with several ranks, ``none`` with one; the others as they are.

    Raises:
        ValueError: a strategy not in STRATEGIES.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy: expected one of {', '.join(STRATEGIES)}, got {strategy!r}")
    if strategy == "auto":
        return "ddp" if dist.world_size > 1 else "none"
    return strategy


def wrap(module: nn.Module, *, strategy: str, dist: Dist, find_unused_parameters: bool = False) -> nn.Module:
    """Move the trained ``module`` to ``dist.device`` and wrap it for ``strategy``; build the optimizer afterwards.

    - ``none``: the module itself.
    - ``ddp``: ``DistributedDataParallel``; every rank keeps the whole model and gradients are averaged.
      ``find_unused_parameters=True`` is needed when some trained parameters get no gradient in some steps (a batch
      whose classifier-free dropout gives every sample the unconditional token leaves the mapper out); those
      parameters then keep no gradient, as in one process. Draw such choices alike on every rank.
    - ``fsdp``: FSDP2 ``fully_shard`` of every block of ``SHARD_UNITS``, then of the root, over a one-dimensional
      device mesh of all ranks (the CPU's with gloo). Parameters become DTensor shards.
    - ``auto``: ``ddp`` with several ranks, ``none`` with one.

    Raises:
        ValueError: an unknown strategy, or ``ddp``/``fsdp`` without a process group (no torchrun).
    """
    chosen = resolve_strategy(strategy, dist)
    if chosen != "none" and not (torch_dist.is_available() and torch_dist.is_initialized()):
        raise ValueError(f"strategy {strategy!r} needs a process group: launch with torchrun --nproc_per_node N "
                         "(setup() joins it), or train one process with strategy 'none'")
    module = module.to(dist.device)
    if chosen == "none":
        return module
    if chosen == "ddp":
        device_ids = [dist.device.index] if dist.device.type == "cuda" else None
        return DistributedDataParallel(module, device_ids=device_ids, find_unused_parameters=find_unused_parameters)
    mesh = init_device_mesh(dist.device.type, (torch_dist.get_world_size(),))
    for unit in shard_units(module):
        fully_shard(unit, mesh=mesh)
    fully_shard(module, mesh=mesh)
    return module


def shard_units(module: nn.Module) -> list[nn.Module]:
    """The outermost submodules of ``module`` that are ``SHARD_UNITS``, in module order (FSDP2 units: each must be
    *called* in the forward, which is why levels, whose blocks the UNet calls one by one, are not units)."""
    units: list[nn.Module] = []

    def visit(parent: nn.Module) -> None:
        for child in parent.children():
            if isinstance(child, SHARD_UNITS):
                units.append(child)
            else:
                visit(child)

    visit(module)
    return units


def unwrap(module: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (FSDP2 modules and plain ones are their own module)."""
    return module.module if isinstance(module, DistributedDataParallel) else module


@contextlib.contextmanager
def no_sync(module: nn.Module) -> Iterator[None]:
    """Within the block, backward passes accumulate gradients without averaging them over ranks (gradient
    accumulation: every micro-batch but the last); a plain module is unaffected."""
    if isinstance(module, DistributedDataParallel):
        with module.no_sync():
            yield
    elif isinstance(module, FSDPModule):
        module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)
    else:
        yield


def full_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's tensors on the CPU under the plain module's names, for pbe's native checkpoint: on rank 0
    (other ranks get an empty dict). With several ranks every rank must call it (FSDP2 gathers the shards)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(module, options=options)


# --------------------------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------------------------


def checkpoint_folder(output_dir: str | os.PathLike[str], step: int) -> Path:
    """``output_dir/checkpoints/step-000120``: where the state after ``step`` optimizer steps is saved."""
    return Path(output_dir) / CHECKPOINTS / f"step-{step:06d}"


def _extra_file(folder: Path, rank: int) -> Path:
    return folder / f"extra-rank{rank}.pt"


def _partial_folder(folder: Path) -> Path:
    # The same name on every rank (no process id): all ranks write into it.
    return folder.parent / f".{folder.name}.{PARTIAL_MARK}"


def is_complete(folder: str | os.PathLike[str]) -> bool:
    """Whether ``folder`` holds a whole training checkpoint (the index and rank 0's extra)."""
    folder = Path(folder)
    return (folder / METADATA).is_file() and _extra_file(folder, 0).is_file()


def latest_checkpoint(output_dir: str | os.PathLike[str]) -> Path | None:
    """The complete ``output_dir/checkpoints/step-N`` with the highest N, or None; partial folders of killed saves
    (``.step-N.pbe-partial``) and incomplete ones are ignored."""
    root = Path(output_dir) / CHECKPOINTS
    if not root.is_dir():
        return None
    found = [(int(match.group(1)), path) for path in root.iterdir()
             if (match := STEP_FOLDER.fullmatch(path.name)) and is_complete(path)]
    return max(found)[1] if found else None


def _check_extra(value: Any, where: str) -> None:
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                raise TypeError(f"{where}: keys must be str or int, got {type(key).__name__}")
            _check_extra(item, f"{where}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_extra(item, f"{where}[{index}]")
    elif not isinstance(value, EXTRA_ALLOWED):
        raise TypeError(f"{where}: expected tensors, numbers, strings, None, lists, tuples or dicts of them "
                        f"(what a checkpoint reloads safely), got {type(value).__name__}")


def _rank_and_world() -> tuple[int, int]:
    if torch_dist.is_available() and torch_dist.is_initialized():
        return torch_dist.get_rank(), torch_dist.get_world_size()
    return 0, 1


@contextlib.contextmanager
def _single_process_quietly() -> Iterator[None]:
    # torch.distributed.checkpoint warns that it assumes one process when no process group exists: it is right.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def _barrier(world_size: int) -> None:
    if world_size > 1:
        torch_dist.barrier()


def _training_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Any], dict[str, Any]]:
    """``get_state_dict`` without its side effect on an optimizer that has not stepped yet: it would give every
    parameter a state (a zero-learning-rate step), so the run would go on differently from one that never saved."""
    fresh = not optimizer.state
    model_state, optimizer_state = get_state_dict(model, optimizer)
    if fresh:
        optimizer.state.clear()
        optimizer_state["state"] = {}
    return model_state, optimizer_state


def save_training_state(folder: str | os.PathLike[str], *, model: nn.Module, optimizer: torch.optim.Optimizer,
                        extra: dict[str, Any]) -> None:
    """Save the model, the optimizer and this rank's ``extra`` into ``folder`` (``checkpoint_folder(out, step)``);
    every rank calls it with the same ``folder``.

    ``model`` may be plain, DDP or FSDP2: it is saved under the plain module's names. ``extra`` holds this rank's
    own values (step, ``scheduler.state_dict()``, ``rng_states()``, data position): tensors, numbers, strings, None
    and lists/tuples/dicts of them. The folder appears whole or not at all: everything is written to
    ``.NAME.pbe-partial`` beside it, which rank 0 renames once every rank is done (an existing ``folder`` is replaced).
    A later save removes the partial folders of killed ones.

    Raises:
        TypeError: ``extra`` holds something a checkpoint cannot reload safely (the message names the key), before
            anything is written.
        OSError: the folder cannot be written.
    """
    _check_extra(extra, "extra")
    folder = Path(folder)
    rank, world_size = _rank_and_world()
    partial = _partial_folder(folder)
    if rank == 0:
        folder.parent.mkdir(parents=True, exist_ok=True)
        # One run writes into its checkpoints folder at a time, so any partial folder there is a killed save's.
        for leftover in folder.parent.glob(f".*.{PARTIAL_MARK}*"):
            shutil.rmtree(leftover)
        partial.mkdir()
    _barrier(world_size)
    try:
        model_state, optimizer_state = _training_state(model, optimizer)
        with _single_process_quietly():
            dcp.save({"model": model_state, "optimizer": optimizer_state}, checkpoint_id=partial)
        torch.save(extra, _extra_file(partial, rank))
    except BaseException:
        if world_size == 1:  # with several ranks the others may still be writing; the next save removes it
            shutil.rmtree(partial, ignore_errors=True)
        raise
    _barrier(world_size)
    if rank == 0:
        replaced = folder.parent / f".{folder.name}.{PARTIAL_MARK}-replaced"
        if folder.exists():
            os.rename(folder, replaced)
        os.rename(partial, folder)
        shutil.rmtree(replaced, ignore_errors=True)
    _barrier(world_size)  # nobody reads the folder before it has its name


def load_training_state(folder: str | os.PathLike[str], *, model: nn.Module,
                        optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Load ``folder`` (written by ``save_training_state`` with any number of ranks) into ``model`` and ``optimizer``
    in place, and return this rank's ``extra``; every rank calls it.

    ``model`` may be plain, DDP or FSDP2, wrapped as it will train (build the optimizer after ``wrap``). A rank that
    did not exist in the saved run gets rank 0's ``extra``: compare the world size you stored there before restoring
    per-rank RNG states.

    Raises:
        FileNotFoundError: ``folder`` is no complete checkpoint.
        ValueError: the checkpoint does not fit ``model`` and ``optimizer`` (the message names a key).
    """
    folder = Path(folder)
    if not is_complete(folder):
        raise FileNotFoundError(f"{str(folder)!r} is no complete training checkpoint (expected {METADATA} and "
                                f"{_extra_file(folder, 0).name} there, written by save_training_state)")
    rank, _ = _rank_and_world()
    model_state, optimizer_state = get_state_dict(model, optimizer)
    saved = dcp.FileSystemReader(str(folder)).read_metadata().state_dict_metadata.keys()
    # A parameter that had no gradient yet when the checkpoint was written has no optimizer state there; it must have
    # none after loading either (AdamW's step count and bias correction start at its first gradient).
    with_state = {key.removeprefix("optimizer.state.") for key in saved if key.startswith("optimizer.state.")}
    optimizer_state["state"] = {name: value for name, value in optimizer_state["state"].items()
                                if any(key.startswith(f"{name}.") for key in with_state)}
    state = {"model": model_state, "optimizer": optimizer_state}
    try:
        with _single_process_quietly():
            dcp.load(state, checkpoint_id=folder)
    except dcp.api.CheckpointException as err:  # a BaseException holding each rank's error and traceback
        cause = next(iter(err.failures.values()))[0] if err.failures else err
        reason = " ".join(str(cause).split()) or type(cause).__name__
        raise ValueError(f"{str(folder)!r} does not fit this model and optimizer: {reason}") from None
    # Not strict: the optimizer state left out above stays out (the model's names were all checked by dcp.load).
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"],
                   options=StateDictOptions(strict=False))
    extra = _extra_file(folder, rank)
    return torch.load(extra if extra.is_file() else _extra_file(folder, 0), map_location="cpu", weights_only=True)


# --------------------------------------------------------------------------------------------------------------------
# Random number generators
# --------------------------------------------------------------------------------------------------------------------


def rng_states() -> dict[str, Any]:
    """This process's global random states (torch CPU, the current CUDA device once CUDA is in use, Python's
    ``random``, NumPy's), in a form ``save_training_state``'s ``extra`` holds."""
    kind, keys, position, has_gauss, gauss = np.random.get_state()
    states: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "position": int(position),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def restore_rng_states(states: Mapping[str, Any]) -> None:
    """Put back the random states ``rng_states`` returned (after a checkpoint round trip)."""
    torch.set_rng_state(states["torch"])
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy = states["numpy"]
    np.random.set_state((numpy["kind"], numpy["keys"].numpy().astype(np.uint32), numpy["position"],
                         numpy["has_gauss"], numpy["gauss"]))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])
