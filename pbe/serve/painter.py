"""One model, one worker thread, a bounded queue: how ``pbe serve`` shares a pipeline between many requests.

The pipeline is not re-entrant on one device, so one thread runs the paintings one at a time, in arrival order.
A request first takes a place (``Painter.reserve``: refused when ``queue`` requests already wait, before its uploads
are read), then hands its painting over (``submit``). Each job reports what happens to it as events
(``queued``/``started``/``progress``/``done``/``error``), put into an asyncio queue of the request's event loop.
Cancelling a job (its client went away) drops it from the queue, or makes the pipeline's per-step callback raise at
the next step: the thread is free for the next job at once. Nothing here knows HTTP.
"""

from __future__ import annotations

import asyncio
import collections
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import PIL.Image
import torch

from .. import images, regions
from ..options import PaintOptions

Event = tuple[str, dict[str, Any]]


class QueueFull(Exception):
    """Refused: ``limit`` requests already wait; ``retry_after`` seconds is when a place is likely free again."""

    def __init__(self, limit: int, retry_after: int) -> None:
        super().__init__(f"the queue is full ({limit} requests waiting); retry in about {retry_after} s")
        self.limit, self.retry_after = limit, retry_after


class Cancelled(Exception):
    """Raised from the pipeline's callback when the job's client went away: the painting stops at that step."""


@dataclass(eq=False)
class Job:
    """One painting: its inputs, options and seed, where its events go, and whether its client went away."""

    example: PIL.Image.Image
    image: PIL.Image.Image
    mask: PIL.Image.Image
    options: PaintOptions
    seed: int
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    steps_run: int = 0  # denoising steps this job's painting ran (all work items together)
    position: int | None = None  # requests ahead of it, last reported
    outcome: str = "queued"  # then running, and done, failed, cancelled or dropped
    first_step_at: float = 0.0  # time.monotonic() at its first step

    def emit(self, name: str, data: dict[str, Any]) -> None:
        """Hand an event to the request's event loop (from any thread); a closed loop (server shut down) drops it."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (name, data))
        except RuntimeError:
            pass

    def cancel(self) -> None:
        """The client went away: drop the job if still queued, or stop its painting at the next step."""
        self.cancelled.set()


@dataclass(frozen=True)
class Finished:
    """What is kept of a job that left the worker (its pictures are not: the server's memory stays flat)."""

    seed: int
    steps: int  # the steps asked for
    steps_run: int  # the steps its painting ran (all work items together)
    outcome: str  # done, failed, cancelled (stopped while painting) or dropped (its client left while it waited)


class Painter:
    """The worker thread and its bounded queue around one pipeline.

    ``pipe`` is called like ``PaintByExample.__call__``; ``queue``: how many requests may wait (the running one aside).
    ``finished`` records the last jobs that left the worker (``Finished``: done, failed, cancelled or dropped), newest
    last, so tests can see how many steps a cancelled painting ran.
    """

    def __init__(self, pipe: Callable[..., Any], *, queue: int) -> None:
        self.pipe, self.limit = pipe, queue
        self._lock = threading.Condition()
        self._waiting: collections.deque[Job] = collections.deque()
        self._reserved = 0  # places taken by requests still uploading
        self._running: Job | None = None
        self._started_at = 0.0
        self._seconds_per_step: float | None = None  # measured: the mean over the paintings so far
        self._steps_measured = 0
        self._stopping = False
        self.finished: collections.deque[Finished] = collections.deque(maxlen=64)
        self._thread = threading.Thread(target=self._work, name="pbe-serve-painter", daemon=True)
        self._thread.start()

    # ---- what the requests see --------------------------------------------------------------------------------------

    @property
    def waiting(self) -> int:
        """Requests waiting (those still uploading included)."""
        with self._lock:
            return len(self._waiting) + self._reserved

    @property
    def busy(self) -> bool:
        """Whether a painting runs now."""
        with self._lock:
            return self._running is not None

    def retry_after(self) -> int:
        """Seconds until a place in a full queue is likely free: the steps left to the painting that runs now (a
        place frees when it ends and the next one starts) times the time per step, measured over the paintings so
        far (before the first ends: over the running one's steps so far), at least 1."""
        with self._lock:
            running = self._running
            if running is None:
                return 1
            per_step = self._seconds_per_step
            if per_step is None and running.steps_run >= 2:  # between its steps: the encoders' setup left out
                per_step = (time.monotonic() - running.first_step_at) / (running.steps_run - 1)
            elif per_step is None:
                per_step = time.monotonic() - self._started_at
            left = max(running.options.steps - running.steps_run, 0)
        return max(1, math.ceil(per_step * left))

    def reserve(self) -> None:
        """Take a place in the queue, or raise ``QueueFull``; ``release`` it unless ``submit`` follows."""
        with self._lock:
            if self._stopping or len(self._waiting) + self._reserved >= self.limit:
                full = True
            else:
                self._reserved += 1
                full = False
        if full:
            raise QueueFull(self.limit, self.retry_after())

    def release(self) -> None:
        """Give back a place taken by ``reserve`` (the request was refused after it)."""
        with self._lock:
            self._reserved -= 1

    def submit(self, job: Job) -> None:
        """Queue ``job`` in the place its request reserved; it gets a ``queued`` event with its position."""
        with self._lock:
            self._reserved -= 1
            if self._stopping:
                job.emit("error", {"status": 503, "detail": "the server is shutting down"})
                return
            self._waiting.append(job)
            self._report_positions()
            self._lock.notify_all()

    def cancel(self, job: Job) -> None:
        """Drop ``job`` from the queue, or stop its painting at the next step."""
        job.cancel()
        with self._lock:
            if job in self._waiting:
                self._waiting.remove(job)
                job.outcome = "dropped"
                self.finished.append(_record(job))
                self._report_positions()

    def stop(self) -> None:
        """Cancel everything and let the thread end (server shutdown)."""
        with self._lock:
            self._stopping = True
            for job in self._waiting:
                job.cancel()
                job.outcome = "dropped"
                job.emit("error", {"status": 503, "detail": "the server is shutting down"})
            self._waiting.clear()
            if self._running is not None:
                self._running.cancel()
            self._lock.notify_all()

    # ---- the worker thread ------------------------------------------------------------------------------------------

    def _report_positions(self) -> None:
        """Tell each waiting job its position when it changed (under the lock)."""
        for index, job in enumerate(self._waiting):
            if job.position != index:
                job.position = index
                job.emit("queued", {"position": index})

    def _next(self) -> Job | None:
        with self._lock:
            while not self._waiting and not self._stopping:
                self._lock.wait()
            if self._stopping:
                return None
            job = self._waiting.popleft()
            job.outcome = "running"
            self._running, self._started_at = job, time.monotonic()
            self._report_positions()
            return job

    def _work(self) -> None:
        while (job := self._next()) is not None:
            try:
                self._paint(job)
            except Exception as err:  # a bug of ours must not end the thread that serves everyone
                job.outcome = "failed"
                job.emit("error", {"status": 500, "detail": _one_line(err)})
            finally:
                with self._lock:
                    elapsed = time.monotonic() - self._started_at
                    if job.outcome == "done" and job.steps_run:
                        total = (self._seconds_per_step or 0.0) * self._steps_measured + elapsed
                        self._steps_measured += job.steps_run
                        self._seconds_per_step = total / self._steps_measured
                    self._running = None
                    self.finished.append(_record(job))

    def _paint(self, job: Job) -> None:
        """Run one job through the pipeline, its events on the way; a failure becomes an ``error`` event."""
        options = job.options
        if job.cancelled.is_set():
            job.outcome = "cancelled"
            job.emit("error", {"status": 503, "detail": "cancelled before it started"})
            return
        job.emit("started", {"steps": options.steps, "seed": job.seed})
        items = _work_items(job.image, job.mask, options)

        def callback(step: int, timestep: int, latents: torch.Tensor) -> None:
            if job.cancelled.is_set():
                raise Cancelled()
            job.steps_run += 1
            if job.steps_run == 1:
                job.first_step_at = time.monotonic()
            # The pipeline's own step index depends on the sampler's warm-up; count the calls instead.
            item, step_in_item = divmod(job.steps_run - 1, options.steps)
            job.emit("progress", {"step": step_in_item + 1, "steps": options.steps, "item": min(item + 1, items),
                                  "items": items})
            if job.cancelled.is_set():
                raise Cancelled()

        generator = torch.Generator().manual_seed(job.seed)  # on the CPU: the same noise on every device (pbe paint)
        try:
            result = self.pipe(job.example, job.image, job.mask, generator=generator, callback=callback,
                               progress=False, options=options)
        except Cancelled:
            job.outcome = "cancelled"  # its client went away, or the server is shutting down: tell whoever listens
            job.emit("error", {"status": 503, "detail": f"cancelled after {job.steps_run} steps"})
            return
        except (ValueError, TypeError) as err:
            job.outcome = "failed"
            job.emit("error", {"status": 422, "detail": _one_line(err)})
            return
        except Exception as err:  # NaN in the latents, out of memory, ...: the client hears it, the server stays up
            job.outcome = "failed"
            job.emit("error", {"status": 500, "detail": _one_line(err)})
            return
        job.outcome = "done"
        job.emit("painted", {"image": result.images[0]})


def _record(job: Job) -> Finished:
    return Finished(job.seed, job.options.steps, job.steps_run, job.outcome)


def _work_items(image: PIL.Image.Image, mask: PIL.Image.Image, options: PaintOptions) -> int:
    """How many work items (model runs) the pipeline makes of this picture: 1 for an ordinary picture."""
    repaint = images.read_repaint_mask(mask)
    plan = regions.plan((image.height, image.width), repaint, strategy=options.hd_strategy,
                        resolution=options.resolution, trigger=options.hd_trigger, margin=options.hd_margin)
    return max(len(plan), 1)


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split()) or type(err).__name__
