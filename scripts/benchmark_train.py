"""Time and peak memory of ONE training step of Paint by Example, per training configuration.

    HF_HUB_OFFLINE=1 .venv/bin/python scripts/benchmark_train.py                  # the whole grid, 512x512, batch 1
    HF_HUB_OFFLINE=1 .venv/bin/python scripts/benchmark_train.py --configs lora-ckpt-fp32,full-ckpt-bf16 --steps 3
    HF_HUB_OFFLINE=1 .venv/bin/python scripts/benchmark_train.py --device cuda --batch 4 --memory-limit 60

One step is what ``pbe train`` does per optimizer step, through the same functions (pbe.train.loop and
pbe.train.step): the frozen autoencoder encodes the scene and the masked scene, the frozen CLIP tower the
reference, the UNet runs forward and backward, AdamW steps (with the warm-up's LR schedule), gradients are dropped.
The networks are the official structure (pbe.model.config's defaults) with random weights built in memory, float32;
``--tiny`` uses the test fixtures' tiny stand-in (tests/fixtures/hub) at 64x64 instead (tests/test_benchmark_train.py).

The grid (``--configs``, default all eight), named METHOD-CHECKPOINTING-PRECISION:
  full | lora    the paper's trained set (the whole UNet, mapper, final norm, projection, uncond token), or a rank-4
                 LoRA (alpha 4) on the UNet's attention projections alone (pbe.model.lora.add_lora)
  ckpt | nockpt  the UNet's gradient checkpointing on or off
  fp32 | bf16    float32, or torch.autocast(bfloat16) on the device with float32 weights and optimizer states

Each configuration runs in a FRESH subprocess: memory measured there belongs to it alone. The child builds the
networks and the optimizer, resets its resident high-water mark (``echo 5 > /proc/self/clear_refs``), runs one
warm-up step (where AdamW allocates its moments) and ``--steps`` timed steps, and reports the median time and
  step peak      VmHWM after the steps: the most memory resident at once during them (weights included)
  process peak   the larger of that and the high-water mark before the reset (building the networks)
  built          the resident set after building, before the first step (weights, mostly)
  cuda peak      with --device cuda, torch.cuda.max_memory_allocated over the steps (reset after building)
The parent samples the child's resident set every 0.1 s and kills a child that passes ``--memory-limit`` GiB
(SIGKILL, before the machine starts swapping or the kernel's OOM killer picks a victim): its row reads "over N GiB"
and the other configurations still run. A configuration that does not fit is a result, not a failure: the exit
status is 1 only when a child failed otherwise (an exception, a signal), else 0.

Output: a Markdown table on stdout and a JSON file (``--output``, default benchmark_train.json) with the machine:
CPU model and its bf16 instruction flags (avx512_bf16, amx_bf16), torch version, threads, and the load average
before and after each configuration (other processes on the machine slow the steps down: the timings are only as
good as the machine was idle).

Figures measured with it (all eight configurations, idle 2-core AMD EPYC with AVX-512-BF16) and what they mean
for a GPU: README, "Training", "What a step costs".
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
for folder in (REPO_ROOT, REPO_ROOT / "scripts"):  # pbe, and the sibling scripts
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
from benchmark import _reset_peak  # noqa: E402 (the inference benchmark's: one way to reset the resident peak)

TINY_HUB = REPO_ROOT / "tests" / "fixtures" / "hub"
FULL_SIDE, TINY_SIDE = 512, 64  # pixels per side of the training images
LORA_RANK, LORA_ALPHA = 4, 4.0
GIB = 2**30
POLL_SECONDS = 0.1  # how often the parent samples a child's resident set
CPU_FLAGS = ("avx512_bf16", "amx_bf16")  # CPU instructions bfloat16 autocast runs fast on


@dataclass(frozen=True)
class Setting:
    """One configuration of the grid."""

    method: str  # "full" (the paper's trained set) or "lora"
    checkpointing: bool  # the UNet's gradient checkpointing
    precision: str  # "fp32" or "bf16" (autocast)

    @property
    def name(self) -> str:
        return f"{self.method}-{'ckpt' if self.checkpointing else 'nockpt'}-{self.precision}"


GRID = [Setting(method, checkpointing, precision) for method in ("full", "lora") for checkpointing in (True, False)
        for precision in ("fp32", "bf16")]
SETTINGS = {setting.name: setting for setting in GRID}


# ---------------------------------------------------------------------------------------------------------------------
# The child: one configuration, measured in a fresh process
# ---------------------------------------------------------------------------------------------------------------------

def _status_kib(field: str, pid: int | str = "self") -> int | None:
    """A kB field of /proc/PID/status (VmRSS, VmHWM); None where it cannot be read (no /proc, process gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None




def _gib(kib: int | None) -> float | None:
    return None if kib is None else kib * 1024 / GIB


def build_networks(tiny: bool) -> Any:
    """The networks, float32 on the CPU: the tiny test stand-in read from tests/fixtures/hub, or the official
    structure with random weights (default initialisation) built in memory."""
    import torch

    if tiny:
        import pbe

        return pbe.load(TINY_HUB, dtype=torch.float32)
    from pbe.loading import PaintByExampleNetworks
    from pbe.model import AutoencoderKL, ImageEncoder, PaintByExampleConfig, UNet

    torch.manual_seed(0)
    config = PaintByExampleConfig()
    return PaintByExampleNetworks(UNet(config.unet), AutoencoderKL(config.vae), ImageEncoder(config.image_encoder),
                                  config)


def training_batch(batch_size: int, side: int, reference_side: int, device: Any) -> dict[str, Any]:
    """A seeded batch in pbe.train.data's format: a scene in [-1, 1], a keep mask with a repainted box, a reference."""
    import torch

    g = torch.Generator().manual_seed(0)
    keep_mask = torch.ones(batch_size, 1, side, side)
    keep_mask[:, :, side // 4: side * 3 // 4, side // 5: side * 3 // 5] = 0
    batch = {"image": torch.rand(batch_size, 3, side, side, generator=g) * 2 - 1, "keep_mask": keep_mask,
             "reference": torch.randn(batch_size, 3, reference_side, reference_side, generator=g)}
    return {k: v.to(device) for k, v in batch.items()}


def measure_job(job: dict) -> dict:
    """Build, set up as pbe.train.loop does, run a warm-up and the timed steps, report time and memory."""
    import torch

    from pbe.train import loop
    from pbe.train import step as train_step
    from pbe.train.config import TrainConfig

    torch.set_num_threads(job["threads"])
    device = torch.device(job["device"])
    setting = SETTINGS[job["setting"]]
    started = time.perf_counter()
    networks = build_networks(job["tiny"])
    side = TINY_SIDE if job["tiny"] else FULL_SIDE
    reference_side = networks.image_encoder.config.clip.image_size
    lora = setting.method == "lora"
    data = TrainConfig().data
    config = TrainConfig(batch_size=job["batch"], precision=setting.precision,
                         gradient_checkpointing=setting.checkpointing, lora_rank=LORA_RANK if lora else None,
                         lora_alpha=LORA_ALPHA if lora else None, workers=0,
                         data=dataclasses.replace(  # the affine warp scales with the reference (data.py checks it)
                             data, resolution=side, reference_size=reference_side,
                             elastic_affine=data.elastic_affine * reference_side / data.reference_size))

    # What pbe.train.loop._train does before its loop (one process: no wrapping).
    torch.manual_seed(config.seed)
    trained = loop._setup_trained(networks, config)
    train_step.freeze_for_training(networks, [p for _, p in trained])
    networks.unet.gradient_checkpointing = config.gradient_checkpointing
    model = train_step.TrainingModel(networks.unet, networks.vae, networks.image_encoder).to(device)
    parameters = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, betas=config.adam_betas, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda n: loop.warmup_factor(n, config))
    batch = training_batch(config.batch_size, side, reference_side, device)
    latent_shape = loop._latent_shape(networks, config)

    def one_step(step: int) -> float:
        """One optimizer step as the loop's; returns its seconds."""
        start = time.perf_counter()
        draws = train_step.draw(config.batch_size, loop._step_generator(config.seed, step),
                                latent_shape=latent_shape, uncond_prob=config.uncond_prob)
        loss = loop.accumulate_gradients(model, [batch], draws, precision=config.precision)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        value = loss.item()  # waits for the device
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        if value != value:  # NaN: a broken step must not pass as a fast one
            raise RuntimeError(f"the loss is {value} at step {step}")
        return seconds

    build_seconds = time.perf_counter() - started
    build_peak, built = _status_kib("VmHWM"), _status_kib("VmRSS")
    was_reset = _reset_peak()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    warmup_seconds = one_step(0)
    times = [one_step(step) for step in range(1, job["steps"] + 1)]
    step_peak = _status_kib("VmHWM")
    everything = sum(p.numel() for p in model.parameters())
    trained_count = sum(p.numel() for p in parameters)
    moments = sum(t.numel() * t.element_size() for state in optimizer.state.values() for t in state.values()
                  if torch.is_tensor(t) and t.dim() > 0)
    result = {
        "median_s": statistics.median(times), "times_s": times, "warmup_s": warmup_seconds, "build_s": build_seconds,
        "built_gib": _gib(built), "step_peak_gib": _gib(step_peak) if was_reset else None,
        "process_peak_gib": _gib(max(k for k in (build_peak, step_peak) if k is not None)),
        "peak_was_reset": was_reset, "parameters": everything, "trained_parameters": trained_count,
        "adam_state_gib": moments / GIB, "unet_parameters": sum(p.numel() for p in networks.unet.parameters()),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        result["cuda_peak_gib"] = torch.cuda.max_memory_allocated(device) / GIB
        result["cuda_name"] = torch.cuda.get_device_name(device)
    return result


def probe_job(job: dict) -> dict:
    """What the parent needs to know of torch without importing it (its memory would then count in every child's
    ru_maxrss, and it checks --device before anything slow)."""
    import torch

    device = torch.device(job["device"])
    available = device.type == "cpu" or torch.cuda.is_available() and (device.index or 0) < torch.cuda.device_count()
    return {"torch": torch.__version__, "device_available": available,
            "cuda_name": torch.cuda.get_device_name(device) if device.type == "cuda" and available else None}


JOBS = {"measure": measure_job, "probe": probe_job}


def worker_main(job_path: Path) -> int:
    job = json.loads(job_path.read_text())
    result = JOBS[job["kind"]](job)
    Path(job["result"]).write_text(json.dumps(result))
    return 0


# ---------------------------------------------------------------------------------------------------------------------
# The parent: one child per configuration, the watchdog, the report (it never imports torch)
# ---------------------------------------------------------------------------------------------------------------------

def run_child(job: dict, workdir: Path, *, memory_limit_gib: float) -> dict:
    """Run ``job`` in a fresh process, killing it if its resident set passes the limit. Returns its result, or
    {"status": "over-limit", ...} or {"status": "error", "error": ...}; "watch_peak_gib" is the largest resident
    set the parent saw (sampled, so a lower bound of the true peak)."""
    job_path, result_path, log_path = (workdir / f"{job['name']}.{suffix}" for suffix in ("job.json", "result.json",
                                                                                           "log"))
    job_path.write_text(json.dumps(job | {"result": str(result_path)}))
    env = os.environ | {"HF_HUB_OFFLINE": "1",
                        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    limit_kib = memory_limit_gib * GIB / 1024
    watch_peak, over = 0, False
    with log_path.open("w") as log:
        child = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", str(job_path)],
                                 env=env, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
        try:
            while child.poll() is None:
                rss = _status_kib("VmRSS", child.pid) or 0
                watch_peak = max(watch_peak, rss)
                if rss > limit_kib:
                    over = True
                    child.kill()
                    break
                time.sleep(POLL_SECONDS)
        finally:
            if child.poll() is None:  # interrupted (Ctrl-C): leave no child behind
                child.kill()
            child.wait()
    watched = {"watch_peak_gib": _gib(watch_peak)}
    if over:
        return watched | {"status": "over-limit", "limit_gib": memory_limit_gib}
    if child.returncode != 0 or not result_path.exists():
        tail = log_path.read_text(errors="replace").strip().splitlines()[-3:]
        how = f"killed by signal {-child.returncode}" if child.returncode < 0 else f"exit status {child.returncode}"
        return watched | {"status": "error", "error": f"{how}: {' | '.join(tail)}"[:500]}
    return watched | {"status": "ok"} | json.loads(result_path.read_text())


def machine_info() -> dict:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    fields = dict(line.split(":", 1) for line in cpuinfo.split("\n\n")[0].splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("flags", "").split())
    memory = _meminfo_kib("MemTotal")
    return {"cpu": fields.get("model name"), "cpu_flags": {flag: flag in flags for flag in CPU_FLAGS},
            "cores": len(os.sched_getaffinity(0)), "memory_gib": _gib(memory), "python": sys.version.split()[0],
            "torch": importlib.metadata.version("torch")}


def _meminfo_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def _load() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def run_benchmark(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="pbe-benchmark-train-") as tmp:
        workdir = Path(tmp)
        probe = {"device_available": True, "cuda_name": None}
        if args.device != "cpu":  # is there such a GPU? (a child answers: the parent never imports torch)
            probe = run_child({"kind": "probe", "name": "probe", "device": args.device}, workdir,
                              memory_limit_gib=args.memory_limit)
            if probe["status"] != "ok":
                raise SystemExit(f"benchmark_train: cannot start torch in a child process: {probe.get('error')}")
        if not probe["device_available"]:
            raise SystemExit(f"--device: expected a device this machine has (cpu, or cuda with a GPU), got "
                             f"{args.device!r} (torch {probe['torch']} sees none)")
        for setting in args.configs:
            load_before = _load()
            job = {"kind": "measure", "name": setting.name, "setting": setting.name, "tiny": args.tiny,
                   "device": args.device, "batch": args.batch, "steps": args.steps, "threads": args.threads}
            result = run_child(job, workdir, memory_limit_gib=args.memory_limit)
            row = {"config": setting.name, **dataclasses.asdict(setting), "load_before": load_before,
                   "load_after": _load(), **result}
            rows.append(row)
            print(f"  {setting.name:<18}{_cell(row)}  [{time.perf_counter() - started:.0f} s]", file=sys.stderr,
                  flush=True)
    return {"machine": machine_info() | {"threads": args.threads, "device": args.device,
                                         "cuda_name": probe.get("cuda_name")},
            "settings": {"standin": "tiny" if args.tiny else "official structure, random weights",
                         "side": TINY_SIDE if args.tiny else FULL_SIDE, "batch": args.batch, "steps": args.steps,
                         "memory_limit_gib": args.memory_limit, "lora_rank": LORA_RANK, "lora_alpha": LORA_ALPHA},
            "wall_s": time.perf_counter() - started, "rows": rows}


def _cell(row: dict) -> str:
    if row["status"] == "over-limit":
        return f"over {row['limit_gib']:g} GiB"
    if row["status"] == "error":
        return f"ERROR {row['error'][:200]}"
    return f"{row['median_s']:.2f} s, step peak {row['step_peak_gib'] or float('nan'):.2f} GiB"


def format_table(report: dict) -> str:
    settings, machine = report["settings"], report["machine"]
    cuda = machine["device"] != "cpu"
    head = ["config", "trained params", "step s (median)", "step peak GiB", "process peak GiB", "built GiB"]
    head += ["cuda peak GiB"] if cuda else []
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for row in report["rows"]:
        if row["status"] != "ok":
            cells = [row["config"], "-", _cell(row)] + ["-"] * (len(head) - 3)
        else:
            cells = [row["config"], f"{row['trained_parameters']:,}", f"{row['median_s']:.2f}",
                     _fmt(row["step_peak_gib"]), _fmt(row["process_peak_gib"]), _fmt(row["built_gib"])]
            cells += [_fmt(row.get("cuda_peak_gib"))] if cuda else []
        lines.append("| " + " | ".join(cells) + " |")
    flags = ", ".join(f"{k} {'yes' if v else 'no'}" for k, v in machine["cpu_flags"].items())
    loads = [row["load_before"][0] for row in report["rows"] if row.get("load_before")]
    side = settings["side"]
    lines += ["", f"{side}x{side}, batch {settings['batch']}, {settings['standin']}; median of {settings['steps']} "
              f"step(s) after 1 warm-up; {machine['device']}, {machine['threads']} threads, "
              f"torch {machine['torch']}; {machine['cpu']} ({flags})"
              + (f"; {machine['cuda_name']}" if machine.get("cuda_name") else "")
              + (f"; 1-min load average {min(loads):.1f}-{max(loads):.1f} before the configurations" if loads else "")]
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


# ---------------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------------

def _positive(kind: type, flag: str) -> Any:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not value > 0 or value != value or value == float("inf"):
            raise argparse.ArgumentTypeError(f"{flag}: expected {'an integer' if kind is int else 'a number'} > 0, "
                                             f"got {text!r}")
        return value

    return parse


def _settings(text: str) -> list[Setting]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in SETTINGS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"--configs: expected a comma-separated subset of {','.join(SETTINGS)}, "
                                         f"got {text!r}")
    return [SETTINGS[n] for n in dict.fromkeys(names)]  # the order given, once each


def _device(text: str) -> str:
    kind, _, index = text.partition(":")
    if kind not in ("cpu", "cuda") or (index and (kind == "cpu" or not index.isdigit())):
        raise argparse.ArgumentTypeError(f"--device: expected cpu, cuda or cuda:N, got {text!r}")
    return text


def build_parser() -> argparse.ArgumentParser:
    cores = len(os.sched_getaffinity(0))
    parser = argparse.ArgumentParser(description="Time and peak memory of one Paint by Example training step per "
                                                 "configuration (full/LoRA, checkpointing on/off, fp32/bf16).")
    parser.add_argument("--configs", type=_settings, default=list(GRID),
                        help=f"comma-separated configurations, run in this order (default all: {','.join(SETTINGS)})")
    parser.add_argument("--batch", type=_positive(int, "--batch"), default=1, help="samples per step (default 1)")
    parser.add_argument("--steps", type=_positive(int, "--steps"), default=2,
                        help="timed steps after one warm-up step; the median is reported (default 2)")
    parser.add_argument("--memory-limit", type=_positive(float, "--memory-limit"), default=20.0, metavar="GIB",
                        help="kill a configuration whose resident memory passes this many GiB (default 20)")
    parser.add_argument("--device", type=_device, default="cpu", help="cpu (default), cuda or cuda:N")
    parser.add_argument("--threads", type=_positive(int, "--threads"), default=cores,
                        help=f"torch threads (default: this machine's {cores} cores)")
    parser.add_argument("--output", type=Path, default=Path("benchmark_train.json"),
                        help="the JSON results file (default ./benchmark_train.json)")
    parser.add_argument("--tiny", action="store_true", help="the tiny test stand-in at 64x64 (for tests)")
    parser.add_argument("--worker", type=Path, default=None, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.worker is not None:
        return worker_main(args.worker)
    folder = args.output.resolve().parent
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        parser.error(f"--output: expected a file in a writable folder, got {str(args.output)!r} ({folder} "
                     f"{'is not writable' if folder.is_dir() else 'does not exist'})")
    report = run_benchmark(args)
    table = format_table(report)
    print(table)
    partial = args.output.with_name(args.output.name + ".tmp")
    partial.write_text(json.dumps(report | {"table": table}, indent=2) + "\n")
    partial.replace(args.output)  # atomic: an interrupted run leaves no half-written file
    print(f"\nwrote {args.output} in {report['wall_s']:.0f} s", file=sys.stderr)
    failed = [row["config"] for row in report["rows"] if row["status"] == "error"]
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # a SIGTERM ends the run as Ctrl-C: children killed
    sys.exit(main())
