"""pbe.train.distributed: torchrun ranks, DDP and FSDP2 on the CPU (gloo), and checkpoints a killed run resumes from.

The trained module is the tiny stand-in UNet of tests/fixtures/hub inside a container like the training loop's (UNet,
a mapper standing for the image encoder's trained parts, an unconditional token), trained with AdamW and a
classifier-free dropout drawn alike on every rank (step 2 drops: the mapper gets no gradient, as in real batches).
Two-rank runs start this file as their worker script under ``torchrun --standalone --nproc_per_node 2``; the kill
test starts it as a single process that SIGKILLs itself at a chosen point of a save. Every process uses one thread.
"""

from __future__ import annotations

import copy
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

import pbe
from pbe.train import distributed
from pbe.train.distributed import (
    Dist,
    all_reduce_mean,
    checkpoint_folder,
    full_state_dict,
    latest_checkpoint,
    load_training_state,
    restore_rng_states,
    rng_states,
    save_training_state,
    setup,
    teardown,
    wrap,
)

ROOT = Path(__file__).resolve().parent.parent
HUB = ROOT / "tests" / "fixtures" / "hub"
TORCHRUN = Path(sys.executable).with_name("torchrun")
STEPS = 3
DROPPED = (False, True, False)  # classifier-free dropout of each step, the same on every rank
LR = 1e-3
# 2 ranks x batch 1 against 1 process x batch 2: the same sums in another order, float rounding apart (measured: at
# most 3e-8 after 3 steps, DDP and FSDP2 alike, on parameters that move by 2e-3); a rank that skipped the averaging
# would be off by about LR.
ROUNDING = {"rtol": 1e-6, "atol": 1e-7}


# ---- the trained module and its batches ----------------------------------------------------------------------------


class Trained(nn.Module):
    """UNet + a mapper of example features + the unconditional token, like the loop's trained container."""

    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        width = unet.config.context_dim
        self.unet = unet
        self.mapper = nn.Linear(width, width)
        self.uncond = nn.Parameter(torch.randn(1, 1, width))

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, features: torch.Tensor,
                drop: bool) -> torch.Tensor:
        context = self.uncond.expand(len(sample), -1, -1) if drop else self.mapper(features)
        return self.unet(sample, timestep, context)


def trained(seed: int = 0) -> Trained:
    torch.manual_seed(seed)
    return Trained(pbe.load(HUB).unet)


def adamw(module: nn.Module) -> torch.optim.AdamW:
    return torch.optim.AdamW(module.parameters(), lr=LR, weight_decay=0.01)


def batch(generator: torch.Generator, size: int = 2) -> tuple[torch.Tensor, ...]:
    """(sample [B, 9, 8, 8], timesteps [B], features [B, 1, 24], target noise [B, 4, 8, 8])."""
    return (torch.randn(size, 9, 8, 8, generator=generator), torch.randint(0, 1000, (size,), generator=generator),
            torch.randn(size, 1, 24, generator=generator), torch.randn(size, 4, 8, 8, generator=generator))


def train_step(module: nn.Module, optimizer: torch.optim.Optimizer, tensors: tuple[torch.Tensor, ...],
               drop: bool) -> torch.Tensor:
    sample, timestep, features, target = tensors
    loss = F.mse_loss(module(sample, timestep, features, drop), target)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


def full_optimizer_state(module: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(module, optimizer, options=options)


def assert_same(actual: object, expected: object, where: str = "") -> None:
    """Bit for bit: tensors with torch.equal, containers item by item."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor) and actual.dtype == expected.dtype, where
        assert torch.equal(actual, expected), f"{where}: max difference {(actual - expected).abs().max().item()}"
    elif isinstance(expected, dict):
        assert isinstance(actual, dict) and actual.keys() == expected.keys(), f"{where}: {actual.keys()}"
        for key in expected:
            assert_same(actual[key], expected[key], f"{where}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), where
        for index, (a, e) in enumerate(zip(actual, expected)):
            assert_same(a, e, f"{where}[{index}]")
    else:
        assert actual == expected, where


# ---- the two-rank worker (this file under torchrun) ----------------------------------------------------------------


def worker(strategy: str, out: Path) -> None:
    """Rank r trains sample r of every batch; rank 0 also trains one plain process on both samples."""
    torch.set_num_threads(1)
    dist = setup("cpu")
    model = trained()
    initial = copy.deepcopy(model.state_dict())
    reference = copy.deepcopy(model)
    wrapped = wrap(model, strategy=strategy, dist=dist, find_unused_parameters=True)
    optimizer = adamw(wrapped)
    generator = torch.Generator().manual_seed(1)
    batches = [batch(generator) for _ in range(STEPS)]
    mine = slice(dist.rank, dist.rank + 1)
    losses = [all_reduce_mean(train_step(wrapped, optimizer, [t[mine] for t in tensors], drop), dist)
              for tensors, drop in zip(batches, DROPPED)]
    state, optimizer_state = full_state_dict(wrapped), full_optimizer_state(wrapped, optimizer)
    extra = {"step": STEPS, "rank": dist.rank, "rng": rng_states()}
    save_training_state(checkpoint_folder(out, STEPS), model=wrapped, optimizer=optimizer, extra=extra)
    if dist.is_main:
        reference_optimizer = adamw(reference)
        reference_losses = [train_step(reference, reference_optimizer, tensors, drop)
                            for tensors, drop in zip(batches, DROPPED)]
        torch.save({"initial": initial, "trained": state, "optimizer": optimizer_state, "extra": extra,
                    "reference": reference.state_dict(), "losses": torch.stack(losses),
                    "reference_losses": torch.stack(reference_losses),
                    "rank_mean": all_reduce_mean(torch.tensor(dist.rank), dist)}, out / "result.pt")
    else:
        all_reduce_mean(torch.tensor(dist.rank), dist)
    teardown(dist)


def environment(**extra: str) -> dict[str, str]:
    paths = [str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
            **extra}


@pytest.fixture(scope="module", params=["ddp", "fsdp"])
def two_ranks(request, tmp_path_factory) -> tuple[Path, dict]:
    """(output folder, rank 0's results) of a 2-rank torchrun of ``worker`` with the strategy ``request.param``."""
    if not TORCHRUN.is_file():
        pytest.fail(f"no torchrun beside {sys.executable}")
    out = tmp_path_factory.mktemp(request.param)
    command = [str(TORCHRUN), "--standalone", "--nproc_per_node", "2", __file__, "worker", request.param, str(out)]
    proc = subprocess.run(command, capture_output=True, text=True, env=environment(), cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out, torch.load(out / "result.pt", weights_only=True)


# ---- (a) several ranks train as one process ----------------------------------------------------------------------


def test_two_ranks_of_batch_1_equal_one_process_of_batch_2(two_ranks) -> None:
    _, result = two_ranks
    trained_state, reference, initial = result["trained"], result["reference"], result["initial"]
    assert trained_state.keys() == reference.keys() == initial.keys()  # plain names, whatever the wrapper
    assert max((reference[k] - initial[k]).abs().max().item() for k in reference) > LR  # it did train
    for name in reference:
        torch.testing.assert_close(trained_state[name], reference[name], **ROUNDING, msg=lambda m: f"{name}: {m}")
    # The dropped step left the mapper without a gradient on every rank, as in one process: AdamW skipped it.
    assert result["optimizer"]["state"]["mapper.weight"]["step"].item() == STEPS - 1
    assert result["optimizer"]["state"]["uncond"]["step"].item() == 1
    torch.testing.assert_close(result["losses"], result["reference_losses"], rtol=1e-6, atol=0)
    assert result["rank_mean"].item() == 0.5


# ---- (b) a checkpoint of two ranks loads into one plain process ----------------------------------------------------


def test_a_checkpoint_written_by_two_ranks_loads_into_one_plain_process(two_ranks) -> None:
    out, result = two_ranks
    folder = latest_checkpoint(out)
    assert folder == checkpoint_folder(out, STEPS)
    model = trained(seed=7)  # other weights: everything below comes from the checkpoint
    optimizer = adamw(model)
    extra = load_training_state(folder, model=model, optimizer=optimizer)
    assert_same(model.state_dict(), result["trained"], "model")
    assert_same(full_optimizer_state(model, optimizer), result["optimizer"], "optimizer")
    assert_same(extra, result["extra"], "extra")
    # Each rank kept its own extra (its rank, its RNG states).
    assert torch.load(folder / "extra-rank1.pt", weights_only=True)["rank"] == 1


# ---- (c) one process: a round trip is bit for bit, and training goes on as if never stopped -------------------------


def warmup(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 10))


def go_on(model: Trained, optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LRScheduler,
          steps: tuple[bool, ...]) -> list[object]:
    """Train ``steps`` more steps on batches drawn from the global RNG; return every random draw made."""
    draws = []
    for drop in steps:
        tensors = batch(torch.default_generator)
        draws += [*tensors, random.random(), np.random.rand()]
        train_step(model, optimizer, tensors, drop)
        scheduler.step()
    return draws


def test_a_round_trip_in_one_process_is_bit_for_bit_and_training_continues_as_if_never_stopped(tmp_path) -> None:
    model = trained()
    optimizer = adamw(model)
    scheduler = warmup(optimizer)
    go_on(model, optimizer, scheduler, (False,))  # the uncond token had no gradient yet: no optimizer state
    assert "uncond" not in full_optimizer_state(model, optimizer)["state"]
    extra = {"step": 1, "scheduler": scheduler.state_dict(), "data": {"epoch": 0, "batches_seen": 1},
             "rng": rng_states()}
    saved = copy.deepcopy({"model": model.state_dict(), "optimizer": full_optimizer_state(model, optimizer)})
    save_training_state(checkpoint_folder(tmp_path, 1), model=model, optimizer=optimizer, extra=extra)
    draws = go_on(model, optimizer, scheduler, (True, False))

    resumed = trained(seed=7)
    resumed_optimizer = adamw(resumed)
    resumed_scheduler = warmup(resumed_optimizer)
    loaded = load_training_state(latest_checkpoint(tmp_path), model=resumed, optimizer=resumed_optimizer)
    assert_same(loaded, extra, "extra")
    assert_same(resumed.state_dict(), saved["model"], "model")
    assert_same(full_optimizer_state(resumed, resumed_optimizer), saved["optimizer"], "optimizer")
    resumed_scheduler.load_state_dict(loaded["scheduler"])
    restore_rng_states(loaded["rng"])
    resumed_draws = go_on(resumed, resumed_optimizer, resumed_scheduler, (True, False))

    assert_same(resumed_draws, draws, "draws")
    assert_same(resumed.state_dict(), model.state_dict(), "model after resuming")
    assert_same(full_optimizer_state(resumed, resumed_optimizer), full_optimizer_state(model, optimizer), "optimizer")
    assert resumed_scheduler.get_last_lr() == scheduler.get_last_lr()


def test_a_save_before_the_first_step_leaves_the_optimizer_as_it_was(tmp_path) -> None:
    model = nn.Linear(2, 2)
    optimizer = adamw(model)
    save_training_state(checkpoint_folder(tmp_path, 0), model=model, optimizer=optimizer, extra={"step": 0})
    assert not optimizer.state  # AdamW's first step still starts its step count and moments
    resumed = nn.Linear(2, 2)
    resumed_optimizer = adamw(resumed)
    extra = load_training_state(checkpoint_folder(tmp_path, 0), model=resumed, optimizer=resumed_optimizer)
    assert extra == {"step": 0}
    assert not resumed_optimizer.state
    assert_same(resumed.state_dict(), model.state_dict(), "model")


# ---- (d) partial folders and killed saves ------------------------------------------------------------------------


KILL_POINTS = {
    # torch.distributed.checkpoint wrote the shards, not yet the index that makes them a checkpoint
    "shards-written": ("torch.distributed.checkpoint.filesystem", "FileSystemWriter", "finish"),
    # every file written into the partial folder, which is about to be renamed
    "before-rename": ("os", None, "rename"),
}


def killer(point: str, out: Path) -> None:
    """Save step 1, then SIGKILL this process at ``point`` of saving step 2."""
    import importlib

    torch.set_num_threads(1)
    model = trained()
    optimizer = adamw(model)
    generator = torch.Generator().manual_seed(1)
    train_step(model, optimizer, batch(generator), False)
    save_training_state(checkpoint_folder(out, 1), model=model, optimizer=optimizer, extra={"step": 1})
    torch.save({"model": model.state_dict(), "optimizer": full_optimizer_state(model, optimizer)}, out / "saved.pt")
    train_step(model, optimizer, batch(generator), False)
    module, cls, name = KILL_POINTS[point]
    owner = importlib.import_module(module) if cls is None else getattr(importlib.import_module(module), cls)
    setattr(owner, name, lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL))
    save_training_state(checkpoint_folder(out, 2), model=model, optimizer=optimizer, extra={"step": 2})


@pytest.mark.parametrize("point", sorted(KILL_POINTS))
def test_a_save_killed_midway_leaves_the_previous_checkpoint_the_latest_and_loadable(tmp_path, point) -> None:
    proc = subprocess.run([sys.executable, __file__, "killer", point, str(tmp_path)], capture_output=True, text=True,
                          env=environment(), cwd=ROOT, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-4000:]
    checkpoints = tmp_path / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == [".step-000002.pbe-partial", "step-000001"]
    assert any((checkpoints / ".step-000002.pbe-partial").iterdir())  # the killed save had written part of it

    assert latest_checkpoint(tmp_path) == checkpoint_folder(tmp_path, 1)
    model = trained(seed=7)
    optimizer = adamw(model)
    assert load_training_state(latest_checkpoint(tmp_path), model=model, optimizer=optimizer) == {"step": 1}
    saved = torch.load(tmp_path / "saved.pt", weights_only=True)
    assert_same(model.state_dict(), saved["model"], "model")
    assert_same(full_optimizer_state(model, optimizer), saved["optimizer"], "optimizer")

    # The next save clears the killed one's leftovers.
    save_training_state(checkpoint_folder(tmp_path, 2), model=model, optimizer=optimizer, extra={"step": 2})
    assert sorted(p.name for p in checkpoints.iterdir()) == ["step-000001", "step-000002"]
    assert latest_checkpoint(tmp_path) == checkpoint_folder(tmp_path, 2)


def test_latest_checkpoint_takes_the_highest_complete_step_and_ignores_partial_folders(tmp_path) -> None:
    assert latest_checkpoint(tmp_path) is None  # no checkpoints folder yet
    model = nn.Linear(2, 2)
    optimizer = adamw(model)
    for step in (5, 40):
        save_training_state(checkpoint_folder(tmp_path, step), model=model, optimizer=optimizer, extra={"step": step})
    checkpoints = tmp_path / "checkpoints"
    # What a killed save leaves, a folder under a step name without its index, and a stray file.
    (checkpoints / ".step-000120.pbe-partial").mkdir()
    (checkpoints / ".step-000120.pbe-partial" / "__0_0.distcp").write_bytes(b"half")
    (checkpoints / "step-000100").mkdir()
    (checkpoints / "step-000200.txt").write_text("not a checkpoint")
    assert latest_checkpoint(tmp_path) == checkpoint_folder(tmp_path, 40)
    assert checkpoint_folder(tmp_path, 40).name == "step-000040"  # zero-padded: the names sort as the steps
    with pytest.raises(FileNotFoundError, match="step-000100' is no complete training checkpoint"):
        load_training_state(checkpoints / "step-000100", model=model, optimizer=optimizer)


# ---- refusals, one process -----------------------------------------------------------------------------------------


LAUNCHER_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture
def launcher(monkeypatch) -> pytest.MonkeyPatch:
    """No launcher variables unless the test sets them."""
    for name in LAUNCHER_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_setup_without_a_launcher_is_one_process_and_joins_nothing(launcher) -> None:
    dist = setup("cpu")
    assert dist == Dist(0, 1, 0, torch.device("cpu")) and dist.is_main
    assert not torch.distributed.is_initialized()
    teardown(dist)
    launcher.setattr(torch.cuda, "is_available", lambda: True)
    launcher.setattr(torch.cuda, "device_count", lambda: 1)
    assert setup("auto").device == torch.device("cuda", 0)


@pytest.mark.parametrize("variables, message", [
    ({"WORLD_SIZE": "2"}, "WORLD_SIZE='2' is set but RANK is not"),
    ({"RANK": "0", "WORLD_SIZE": "2"}, "WORLD_SIZE=2 but MASTER_ADDR and MASTER_PORT not set: launch with torchrun"),
    ({"RANK": "2", "WORLD_SIZE": "2"}, "expected 0 <= RANK < WORLD_SIZE"),
])
def test_setup_refuses_an_incomplete_launch_before_joining(launcher, variables, message) -> None:
    for name, value in variables.items():
        launcher.setenv(name, value)
    with pytest.raises(ValueError, match=message):
        setup("cpu")
    assert not torch.distributed.is_initialized()


def test_setup_refuses_a_gpu_this_machine_does_not_have(launcher) -> None:
    launcher.setattr(torch.cuda, "is_available", lambda: True)
    launcher.setattr(torch.cuda, "device_count", lambda: 2)
    for name, value in {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "3", "MASTER_ADDR": "127.0.0.1",
                        "MASTER_PORT": "1"}.items():
        launcher.setenv(name, value)
    with pytest.raises(ValueError, match=r"rank 3 \(LOCAL_RANK=3\) would train on cuda:3, but PyTorch sees 2 CUDA"):
        setup("auto")
    assert not torch.distributed.is_initialized()
    launcher.setattr(torch.cuda, "is_available", lambda: False)
    launcher.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(ValueError, match="device 'cuda': PyTorch sees no CUDA GPU here"):
        setup("cuda")


def test_wrap_refuses_an_unknown_strategy_and_a_distributed_one_without_ranks() -> None:
    dist = Dist(0, 1, 0, torch.device("cpu"))
    module = nn.Linear(2, 2)
    with pytest.raises(ValueError, match="strategy: expected one of auto, none, ddp, fsdp, got 'fsdp2'"):
        wrap(module, strategy="fsdp2", dist=dist)
    for strategy in ("ddp", "fsdp"):
        with pytest.raises(ValueError, match=f"strategy '{strategy}' needs a process group: launch with torchrun"):
            wrap(module, strategy=strategy, dist=dist)
    assert wrap(module, strategy="auto", dist=dist) is module
    assert all_reduce_mean(torch.tensor([1, 3]), dist).tolist() == [1.0, 3.0]


def test_fsdp_shards_every_block_the_unet_calls(tmp_path) -> None:
    model = trained()
    units = distributed.shard_units(model)
    unet = model.unet
    expected = [block for level in unet.down for block in [*level.res, *(level.attn or []), level.resample] if block]
    expected += [unet.mid_res1, unet.mid_attn, unet.mid_res2]
    expected += [block for level in unet.up for block in [*level.res, *(level.attn or []), level.resample] if block]
    assert {id(u) for u in units} == {id(b) for b in expected} and len(units) == len(expected)


def test_a_save_refuses_extra_it_could_not_reload_before_writing(tmp_path) -> None:
    model = nn.Linear(2, 2)
    with pytest.raises(TypeError, match=r"extra\['data'\]\['order'\]: expected tensors, .* got ndarray"):
        save_training_state(checkpoint_folder(tmp_path, 1), model=model, optimizer=adamw(model),
                            extra={"step": 1, "data": {"order": np.arange(3)}})
    assert not tmp_path.joinpath("checkpoints").exists()


def test_a_checkpoint_of_another_model_is_refused_naming_it(tmp_path) -> None:
    model = nn.Linear(2, 2)
    save_training_state(checkpoint_folder(tmp_path, 1), model=model, optimizer=adamw(model), extra={})
    other = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="step-000001' does not fit this model and optimizer: Missing key in "
                                         "checkpoint state_dict: model.0.weight"):
        load_training_state(checkpoint_folder(tmp_path, 1), model=other, optimizer=adamw(other))
    wider = nn.Linear(2, 3)
    with pytest.raises(ValueError, match=r"does not fit .*: Size mismatch between saved torch.Size\(\[2, 2\]\) and "
                                         r"current: torch.Size\(\[3, 2\]\) for model.weight"):
        load_training_state(checkpoint_folder(tmp_path, 1), model=wider, optimizer=adamw(wider))


if __name__ == "__main__":  # the worker of the subprocess tests
    {"worker": worker, "killer": killer}[sys.argv[1]](sys.argv[2], Path(sys.argv[3]))
