"""The training loop: ``train(config) -> Path``, what ``pbe train`` runs (one process, or one per GPU under torchrun).

Per optimizer step: one set of draws for the whole step's samples (``step.draw``, from a generator seeded by
(seed, step)); each micro-batch of each process takes its rows of it, so N processes x batch b x A accumulation
steps compute exactly the step of one process with batch N * A * b (up to float rounding). Gradients are averaged
over processes (DDP or FSDP2, pbe.train.distributed), the warm-up sets the learning rate, AdamW steps.

What the run writes into ``output_dir``: ``log.jsonl`` (one line every log_every steps; TensorBoard events too when
it is installed), ``validation/step-N.png`` (rows: masked scene | example | painting), resumable checkpoints under
``checkpoints/`` every checkpoint_every steps and at the end, and the final model: ``model.safetensors`` (pbe's
native file, which ``pbe paint --checkpoint`` loads) or, with LoRA, ``lora.safetensors``. A killed run started again
with the same command continues from its last checkpoint; on one CPU process bit for bit as if never stopped (the
data order and augmentations depend on (seed, epoch, index), the draws on (seed, step), the rest is in the
checkpoint).
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from .. import devices
from ..errors import UsageError
from ..batch import save_image
from ..checkpoint import NETWORK_NAMES, save_native
from ..images import CLIP_MEAN, CLIP_STD
from ..loading import PaintByExampleNetworks, load, resolve_checkpoint
from ..pipeline import PaintByExample
from . import distributed
from . import step as train_step
from .config import TrainConfig
from .data import PaintByExampleDataset, make_loader

FINAL_MODEL = "model.safetensors"
FINAL_LORA = "lora.safetensors"
LOG = "log.jsonl"
BATCH_KEYS = ("image", "keep_mask", "reference")  # what a training step reads of a sample (pbe.train.data's format)


def warmup_factor(step: int, config: TrainConfig) -> float:
    """The learning rate after ``step`` optimizer steps, as a fraction of ``config.lr``: linear from warmup_start to 1
    over warmup_steps, then 1 (configs/v1.yaml's LambdaLinearScheduler with f_start 1e-6, f_max = f_min = 1)."""
    if step >= config.warmup_steps:
        return 1.0
    return config.warmup_start + (1.0 - config.warmup_start) * step / config.warmup_steps


def train(
    config: TrainConfig,
    *,
    dataset: Dataset | None = None,
    validation_dataset: Dataset | None = None,
    networks: PaintByExampleNetworks | None = None,
) -> Path:
    """Train as ``config`` says and return the final model's path (``model.safetensors``, or ``lora.safetensors``).

    ``dataset`` / ``validation_dataset``: any map-style datasets of {"image", "keep_mask", "reference"} samples
    (pbe.train.data's format) instead of ``config.manifest`` / ``config.validation_manifest``; ``networks``: networks
    to train instead of loading them as ``config.init`` says. Under torchrun each process runs this; only rank 0
    prints and writes. Refused before anything slow, with a ValueError naming the setting: an output folder that
    cannot be written, no training data, a dataset smaller than one optimizer step's samples.
    """
    dist = distributed.setup(config.device)
    try:
        return _train(config, dist, distributed, dataset, validation_dataset, networks)
    finally:
        distributed.teardown(dist)


def _train(config: TrainConfig, dist: Any, distributed: Any, dataset: Dataset | None,
           validation_dataset: Dataset | None, networks: PaintByExampleNetworks | None) -> Path:
    is_main = dist.rank == 0
    strategy = _strategy(config, dist.world_size)
    output_dir = _writable_folder(Path(config.output_dir))

    # ---- data (refusals first: nothing slow has happened yet)
    if dataset is None:
        if config.manifest is None:
            raise UsageError("manifest: expected the training manifest (JSONL or CSV of pictures with object boxes)")
        dataset = PaintByExampleDataset(config.manifest, config=config.data, seed=config.seed)
        if validation_dataset is None and config.validation_manifest is not None:
            validation_dataset = PaintByExampleDataset(config.validation_manifest, config=config.data,
                                                       seed=config.seed)
    for name in ("validation_clip", "validation_mixture"):
        value = getattr(config, name)
        if value is not None and not Path(value).expanduser().exists():
            raise UsageError(f"{name}: {value}: no such file or folder")
    samples_per_step = dist.world_size * config.batch_size * config.grad_accumulation
    if len(dataset) < samples_per_step:
        raise UsageError(f"manifest: {len(dataset)} training sample(s), fewer than one optimizer step takes "
                         f"({dist.world_size} process(es) x batch_size {config.batch_size} x grad_accumulation "
                         f"{config.grad_accumulation} = {samples_per_step})")
    loader = make_loader(dataset if isinstance(dataset, PaintByExampleDataset) else _EpochIndexed(dataset),
                         batch_size=config.batch_size, workers=config.workers, seed=config.seed, rank=dist.rank,
                         world_size=dist.world_size)
    steps_per_epoch = len(loader) // config.grad_accumulation
    total_steps = config.epochs * steps_per_epoch
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    if not config.resume and distributed.latest_checkpoint(output_dir) is not None:
        raise UsageError(f"resume: false, but {output_dir} holds the checkpoints of an earlier run; resume it, or "
                         "give another output_dir")
    shown = dataset if validation_dataset is None else validation_dataset
    validation_rows = _validation_rows(shown, config) if config.validate_every else None

    # ---- networks: what trains, how it is wrapped, the optimizer
    output_dir.mkdir(parents=True, exist_ok=True)  # only now: a refused run leaves nothing behind
    torch.manual_seed(config.seed)
    if networks is None:
        networks = _load_networks(config, dist.device)
    trained = _setup_trained(networks, config)
    train_step.freeze_for_training(networks, [p for _, p in trained])
    networks.unet.gradient_checkpointing = config.gradient_checkpointing
    model = train_step.TrainingModel(networks.unet, networks.vae, networks.image_encoder).to(dist.device)
    wrapped = distributed.wrap(model, strategy=strategy, dist=dist)
    parameters = [p for p in wrapped.parameters() if p.requires_grad]  # FSDP2 replaces them by sharded ones
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, betas=config.adam_betas,
                                  weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda n: warmup_factor(n, config))
    ema = [p.detach().clone() for p in parameters] if config.ema_decay is not None else None

    if is_main and config.precision == "bf16" and not devices.native_precision(dist.device, torch.bfloat16):
        print(f"warning: precision bf16: {dist.device.type} has no bfloat16 instructions here, so it is emulated and "
              "far slower than fp32 (see pbe.devices); use --precision fp32", file=sys.stderr)

    # ---- resume
    step = 0
    latest = distributed.latest_checkpoint(output_dir) if config.resume else None
    if latest is not None:
        extra = distributed.load_training_state(latest, model=wrapped, optimizer=optimizer)
        step = int(extra["step"])
        if int(extra["samples_per_step"]) != samples_per_step or int(extra["steps_per_epoch"]) != steps_per_epoch:
            raise UsageError(f"resume: {latest} was written by a run with {extra['samples_per_step']} samples and "
                             f"{extra['steps_per_epoch']} steps per epoch, this one has {samples_per_step} and "
                             f"{steps_per_epoch}; resume with the same processes, batch_size and grad_accumulation, "
                             "or start a new output_dir")
        if ema is not None:
            for i, average in enumerate(ema):
                average.copy_(extra["ema"][str(i)])
        # The warm-up depends on the step alone: set it where the stopped run left it.
        schedule.last_epoch = step
        for group, base in zip(optimizer.param_groups, schedule.base_lrs):
            group["lr"] = base * warmup_factor(step, config)
        if is_main:
            print(f"resuming from {latest} (step {step} of {total_steps})", file=sys.stderr)

    # ---- the loop
    log = _Log(output_dir, enabled=is_main)
    latent_shape = _latent_shape(networks, config)
    progress = tqdm(total=total_steps, initial=step, unit="step", disable=not is_main, dynamic_ncols=True)
    window_loss, window_steps, window_start = 0.0, 0, time.perf_counter()
    try:
        while step < total_steps:
            epoch, position = divmod(step, steps_per_epoch)
            loader.batch_sampler.set_epoch(epoch, skip_batches=position * config.grad_accumulation)
            batches = iter(loader)
            for _ in range(position, steps_per_epoch):
                draws = train_step.draw(samples_per_step, _step_generator(config.seed, step),
                                        latent_shape=latent_shape, uncond_prob=config.uncond_prob)
                micro_batches = [next(batches) for _ in range(config.grad_accumulation)]
                step_loss = accumulate_gradients(wrapped, micro_batches, draws, rank=dist.rank,
                                                 world_size=dist.world_size, precision=config.precision)
                if config.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(parameters, config.max_grad_norm)
                lr = optimizer.param_groups[0]["lr"]  # the rate this step uses
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
                if ema is not None:
                    with torch.no_grad():
                        torch._foreach_lerp_(ema, [p.detach() for p in parameters], 1.0 - config.ema_decay)
                step += 1

                value = distributed.all_reduce_mean(step_loss, dist).item()
                if not math.isfinite(value):
                    raise RuntimeError(f"the loss is {value} at step {step}: lower lr, or use precision fp32")
                window_loss, window_steps = window_loss + value, window_steps + 1
                progress.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.2e}", refresh=False)
                progress.update(1)
                if step % config.log_every == 0 or step == total_steps:
                    elapsed = time.perf_counter() - window_start
                    log.write(step=step, epoch=epoch, loss=window_loss / window_steps, lr=lr,
                              steps_per_second=window_steps / elapsed if elapsed > 0 else None)
                    window_loss, window_steps, window_start = 0.0, 0, time.perf_counter()
                if validation_rows is not None and step % config.validate_every == 0:
                    painted = _validate(wrapped, networks, validation_rows, config, output_dir / "validation" /
                                        f"step-{step:07d}.png", write=is_main)
                    if painted is not None and config.validation_clip is not None:
                        log.write(step=step, **_validation_scores(painted, validation_rows, config))
                if step % config.checkpoint_every == 0 or step == total_steps:
                    extra = {"step": step, "samples_per_step": samples_per_step, "steps_per_epoch": steps_per_epoch}
                    if ema is not None:
                        extra["ema"] = {str(i): average for i, average in enumerate(ema)}
                    distributed.save_training_state(distributed.checkpoint_folder(output_dir, step), model=wrapped,
                                                    optimizer=optimizer, extra=extra)
                if step >= total_steps:
                    break
    finally:
        progress.close()
        log.close()

    return _save_final(wrapped, networks, config, output_dir, ema=ema, parameters=parameters, strategy=strategy,
                       write=is_main, distributed=distributed, dist=dist)


def accumulate_gradients(model: nn.Module, micro_batches: list[dict[str, torch.Tensor]], draws: train_step.Draws, *,
                         rank: int = 0, world_size: int = 1, precision: str = "fp32") -> torch.Tensor:
    """Backward of one optimizer step's loss: the mean over its micro-batches (and, through DDP/FSDP, over the
    processes), each taking its rows of the step's ``draws``. Returns this process's loss (detached).

    Micro-batch ``j`` of process ``r`` holds samples ``(j * world_size + r) * b`` onwards of the step (the order
    pbe.train.data's loader deals them in), so any split of one step's samples over processes and micro-batches
    gives the gradient of the whole batch at once.
    """
    device = next(p for p in model.parameters()).device
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")
    total = torch.zeros((), device=device)
    for j, batch in enumerate(micro_batches):
        batch = {k: batch[k].to(device, non_blocking=True) for k in BATCH_KEYS}
        first = (j * world_size + rank) * len(batch["image"])
        with _gradient_sync(model, j == len(micro_batches) - 1), autocast:
            loss = model(batch, draws.rows(first, first + len(batch["image"])))
        (loss / len(micro_batches)).backward()
        total += loss.detach() / len(micro_batches)
    return total


# ---- pieces of the run ----------------------------------------------------------------------------------------------


def _strategy(config: TrainConfig, world_size: int) -> str:
    if config.strategy == "auto":
        return "ddp" if world_size > 1 else "none"
    if config.strategy == "none" and world_size > 1:
        raise UsageError(f"strategy: 'none' cannot train {world_size} processes (their weights would drift apart); "
                         "use ddp, fsdp or auto")
    return config.strategy


def _writable_folder(folder: Path) -> Path:
    """``folder`` if it can be written, or created and then written (its nearest existing parent is tried, nothing is
    created yet); ValueError naming it otherwise."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(20, f"{existing} is a file, not a folder")
        with tempfile.TemporaryFile(dir=existing):  # os.access is not enough: root passes it on read-only mounts
            pass
    except OSError as err:
        raise UsageError(f"output_dir: cannot write in the folder {folder} ({err.strerror or err})") from None
    return folder


def _load_networks(config: TrainConfig, device: torch.device) -> PaintByExampleNetworks:
    if config.init == "stable-diffusion":
        from .init import networks_from_stable_diffusion

        networks = networks_from_stable_diffusion(config.sd_checkpoint, config.clip_checkpoint, seed=config.seed)
    else:
        networks = load(resolve_checkpoint(config.checkpoint), dtype=torch.float32, device="cpu")
    for name in NETWORK_NAMES:
        getattr(networks, name).to(device)
    return networks


def _setup_trained(networks: PaintByExampleNetworks, config: TrainConfig) -> list[tuple[str, nn.Parameter]]:
    """The trained parameters by name: the paper's set, or, with lora_rank, the LoRA weights added to the UNet."""
    if config.lora_rank is None:
        return list(train_step.trained_parameters(networks))
    from ..model.lora import add_lora

    added = {id(p) for p in add_lora(networks.unet, rank=config.lora_rank, alpha=config.lora_effective_alpha)}
    # LoRA on the cross-attention's queries and keys would get no gradient either (see step.NO_GRADIENT).
    return [(f"unet.{name}", p) for name, p in networks.unet.named_parameters()
            if id(p) in added and not any(part in f".{name}" for part in train_step.NO_GRADIENT)]


def _latent_shape(networks: PaintByExampleNetworks, config: TrainConfig) -> tuple[int, int, int]:
    vae = networks.vae.config
    side = config.data.resolution // vae.downscale
    return vae.latent_channels, side, side


def _step_generator(seed: int, step: int) -> torch.Generator:
    """The generator of one optimizer step's draws: a function of (seed, step), so a resumed run draws the same."""
    return torch.Generator().manual_seed(seed * 2**32 + step)


@contextlib.contextmanager
def _gradient_sync(model: nn.Module, sync: bool) -> Iterator[None]:
    """Accumulating micro-batches: processes exchange gradients only on the last one (DDP's no_sync, FSDP2's
    set_requires_gradient_sync); a plain module needs nothing."""
    if sync:
        yield
    elif hasattr(model, "no_sync"):
        with model.no_sync():
            yield
    elif hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)
    else:
        yield


class _Log:
    """log.jsonl, plus TensorBoard event files when torch.utils.tensorboard can be imported (rank 0 only)."""

    def __init__(self, output_dir: Path, *, enabled: bool) -> None:
        self.file = (output_dir / LOG).open("a", encoding="utf-8") if enabled else None
        self.board = None
        if enabled:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is optional
                pass
            else:
                self.board = SummaryWriter(str(output_dir / "tensorboard"))

    def write(self, *, step: int, **values: Any) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps({"step": step, **values, "time": time.time()}) + "\n")
        self.file.flush()
        if self.board is not None:
            for name, value in values.items():
                if isinstance(value, float):
                    self.board.add_scalar(f"train/{name}", value, step)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.board is not None:
            self.board.close()


# ---- validation -----------------------------------------------------------------------------------------------------


def _validation_rows(dataset: Dataset, config: TrainConfig) -> dict[str, torch.Tensor] | None:
    """The first validation_samples samples, read once at epoch 0 (the same pictures every time)."""
    count = min(config.validation_samples, len(dataset))
    if count == 0:
        return None
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(0)
    samples = [dataset[i] for i in range(count)]
    return {key: torch.stack([s[key] for s in samples]) for key in BATCH_KEYS}


@torch.no_grad()
def _validate(wrapped: nn.Module, networks: PaintByExampleNetworks, rows: dict[str, torch.Tensor],
              config: TrainConfig, path: Path, *, write: bool) -> torch.Tensor | None:
    """Paint the validation rows with the networks as they are now; one grid PNG, a row per sample: masked scene,
    example, painting. Every process paints (FSDP2 needs all of them to gather the weights); rank 0 writes and gets
    the paintings back ([N, 3, H, W] in [0, 1]; the others None)."""
    networks.unet.eval()
    networks.image_encoder.eval()
    if hasattr(wrapped, "unshard"):  # FSDP2: the root's own weights, gathered outside its forward
        wrapped.unshard()
    try:
        pipe = PaintByExample(networks.unet, networks.vae, networks.image_encoder)
        device = next(networks.unet.parameters()).device
        image, keep_mask = rows["image"].to(device), rows["keep_mask"].to(device)
        painted = pipe(rows["reference"].to(device), image, 1 - keep_mask, options=config.validation_options,
                       generator=torch.Generator().manual_seed(config.seed), output_type="pt", progress=False).images
    finally:
        if hasattr(wrapped, "reshard"):
            wrapped.reshard()
        networks.unet.train()
        networks.image_encoder.train()
    if not write:
        return None
    size = image.shape[-1]
    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    example = torch.nn.functional.interpolate(rows["reference"] * std + mean, size=(size, size), mode="bilinear")
    masked = (image.cpu() * keep_mask.cpu() + 1) / 2
    grid = torch.cat([torch.cat([masked, example, painted.cpu()], dim=-1)[i] for i in range(len(masked))], dim=-2)
    import PIL.Image

    pixels = (grid.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(PIL.Image.fromarray(pixels), path)
    return painted.cpu()


def _validation_scores(painted: torch.Tensor, rows: dict[str, torch.Tensor], config: TrainConfig) -> dict[str, float]:
    """pbe eval's metrics of the validation paintings (``validation_clip``): the region CLIP score against the
    (augmented) references, in the box around each repaint mask, and QS with ``validation_mixture``; FID needs far
    more pictures than a validation set holds and is left to ``pbe eval``."""
    import PIL.Image

    from ..evaluation import score_pictures
    from ..evaluation.features import load_clip_features
    from ..evaluation.metrics import load_gaussian_mixture

    clip = _CLIP.get(config.validation_clip)
    if clip is None:  # loaded once per run
        clip = _CLIP.setdefault(config.validation_clip, load_clip_features(config.validation_clip))
    mixture = load_gaussian_mixture(config.validation_mixture) if config.validation_mixture is not None else None

    def picture(pixels: torch.Tensor) -> PIL.Image.Image:  # [3, H, W] in [0, 1]
        return PIL.Image.fromarray((pixels.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy())

    mean, std = torch.tensor(CLIP_MEAN).view(3, 1, 1), torch.tensor(CLIP_STD).view(3, 1, 1)
    references = [picture(r * std + mean) for r in rows["reference"]]
    masks = [PIL.Image.fromarray(((1 - m[0]) * 255).round().to(torch.uint8).numpy(), "L") for m in rows["keep_mask"]]
    scores = score_pictures(clip, [picture(x) for x in painted], references=references, masks=masks, mixture=mixture)
    return {f"validation_{name}": value for name, value in scores.items() if value is not None}


_CLIP: dict[str, nn.Module] = {}  # validation_clip checkpoints already loaded in this process


# ---- the final model ------------------------------------------------------------------------------------------------


def _save_final(wrapped: nn.Module, networks: PaintByExampleNetworks, config: TrainConfig, output_dir: Path, *,
                ema: list[torch.Tensor] | None, parameters: list[nn.Parameter], strategy: str, write: bool,
                distributed: Any, dist: Any) -> Path:
    """The final model in pbe's native format (``pbe paint --checkpoint`` loads it), with the EMA weights when an EMA
    was kept; with LoRA the LoRA file. Full (unsharded) weights are gathered on every process, written by rank 0."""
    if ema is not None:  # the averaged weights are the ones to paint with
        for parameter, average in zip(parameters, ema):
            parameter.data.copy_(average)
    if config.lora_rank is not None:
        path = output_dir / FINAL_LORA
        if write:
            _save_lora(path, networks.unet, config)
        return path
    if strategy == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        state = get_model_state_dict(wrapped, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    else:
        state = {f"{name}.{k}": v for name in NETWORK_NAMES for k, v in getattr(networks, name).state_dict().items()}
    path = output_dir / FINAL_MODEL
    if write:
        state_dicts = {name: {k.removeprefix(f"{name}."): v.detach().cpu() for k, v in state.items()
                              if k.startswith(f"{name}.")} for name in NETWORK_NAMES}
        save_native(state_dicts, networks.config, path)
    return path


def _save_lora(path: Path, unet: nn.Module, config: TrainConfig) -> None:
    from ..lora_files import save_lora

    save_lora(path, unet, base=str(config.checkpoint))


class _EpochIndexed(Dataset):
    """Any map-style dataset behind pbe.train.data's loader, whose batch sampler asks for ``(epoch, index)`` (so that
    augmentations can depend on the epoch in worker processes too): the epoch is dropped."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]) -> Any:
        return self.dataset[item[1]]
