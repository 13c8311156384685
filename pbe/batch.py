"""Many pictures with one model load: manifests, row planning, seeds, ranks, restartable painting.

A manifest lists one painting per row: JSONL (one object per line) or CSV with a header, with the fields ``image``,
``mask``, ``example`` (paths relative to the manifest's folder) and optional ``seed`` and ``output`` (relative to the
output folder; default: the image's file stem + ``.png``)::

    {"image": "photos/cat.jpg", "mask": "masks/cat.png", "example": "examples/dog.jpg", "seed": 7}

Row ``i`` (counted from 0, blank lines and the CSV header are not rows) is painted with its ``seed`` field, else with
``seed + i``: the same noise as ``pbe paint --seed ...`` on that row alone, so every output can be repeated by itself.
Outputs are written atomically and rows whose output exists are skipped (unless ``overwrite``), so a killed run
continues where it stopped. Under a distributed launcher (``torchrun``: environment variables RANK and WORLD_SIZE) row
``i`` belongs to rank ``i mod WORLD_SIZE``; a row's result does not depend on which rank paints it.

From Python::

    pipe = PaintByExample.from_pretrained(...)
    outcomes = pbe.batch.paint_manifest(pipe, "data/manifest.jsonl", "painted", options=pbe.PaintOptions(steps=50))
    failed = [o for o in outcomes if o.status == "failed"]
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from . import images
from .devices import Ranks, ranks_from_environment  # noqa: F401 -- pbe.batch.ranks_from_environment stays
from .errors import UsageError
from .files import write_atomically
from .options import PaintOptions
from .pipeline import PaintByExample

FIELDS = ("image", "mask", "example", "seed", "output")  # what a manifest row may hold
INPUT_FIELDS = ("image", "mask", "example")  # required, paths relative to the manifest's folder
STATUSES = ("painted", "skipped", "failed")  # a row's outcome
OUTPUT_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}  # output suffix -> Pillow format
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes 0 .. 2**64 - 1
JSONL_SUFFIXES = (".jsonl", ".ndjson")
CSV_SUFFIXES = (".csv",)


class ManifestError(UsageError):
    """A manifest that cannot be painted as written (malformed, duplicate outputs, ...); the message names the row.
    A usage error: ``pbe batch`` exits with status 2 before anything loads."""


@dataclass(frozen=True)
class Row:
    """One row of a manifest, its input paths already joined to the manifest's folder."""

    index: int  # 0-based among the rows (the default seed is base seed + index)
    image: Path
    mask: Path
    example: Path
    output: Path  # relative to the output folder
    seed: int | None = None  # None: the run's base seed + index
    where: str = ""  # where the row came from, for messages ("manifest.csv line 5")

    @property
    def name(self) -> str:
        """``row 3 (manifest.csv line 5)``: how messages refer to this row."""
        return f"row {self.index}" + (f" ({self.where})" if self.where else "")


@dataclass(frozen=True)
class RowOutcome:
    """What happened to one row: ``painted``, ``skipped`` (its output existed) or ``failed`` (``error`` says why)."""

    row: Row
    status: Literal["painted", "skipped", "failed"]  # one of STATUSES
    seed: int  # the seed the row is (or would be) painted with
    output: Path  # the output file: the output folder / row.output
    error: str | None = None


# --------------------------------------------------------------------------------------------------------------------
# Reading manifests
# --------------------------------------------------------------------------------------------------------------------


def read_manifest(path: str | os.PathLike[str]) -> list[Row]:
    """Read and check a JSONL (``.jsonl``, ``.ndjson``) or CSV (``.csv``, with a header) manifest.

    Raises:
        FileNotFoundError / OSError: the manifest cannot be read.
        ManifestError: the manifest is malformed (message names the row and line), holds no rows, or two rows write
            the same output.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in JSONL_SUFFIXES + CSV_SUFFIXES:
        raise ManifestError(f"manifest {path}: expected a file name ending in "
                            f"{', '.join(JSONL_SUFFIXES + CSV_SUFFIXES)} (JSONL or CSV with a header), got {suffix!r}")
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {str(path)!r}")
    try:
        text = path.read_text(encoding="utf-8-sig")  # -sig: spreadsheet programs often write a byte-order mark
    except UnicodeDecodeError as err:
        raise ManifestError(f"manifest {path}: not UTF-8 text ({err})") from None
    records = _jsonl_records(text, path.name) if suffix in JSONL_SUFFIXES else _csv_records(text, path.name)
    return parse_rows(records, base_dir=path.parent)


def _jsonl_records(text: str, name: str) -> Iterable[tuple[str, Mapping[str, Any]]]:
    lines = [(number, line) for number, line in enumerate(text.splitlines(), start=1) if line.strip()]
    for index, (number, line) in enumerate(lines):
        where = f"{name} line {number}"
        try:
            record = json.loads(line, parse_float=Decimal)  # a seed 7.0 exactly as written, never rounded
        except json.JSONDecodeError as err:
            raise ManifestError(f"row {index} ({where}): not valid JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(record, dict):
            raise ManifestError(f"row {index} ({where}): expected a JSON object such as "
                                f'{{"image": ..., "mask": ..., "example": ...}}, got {type(record).__name__}')
        yield where, record


def _csv_records(text: str, name: str) -> Iterable[tuple[str, Mapping[str, Any]]]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    # `image, mask, example` as people type it: spaces around names and cells are layout, not content.
    reader.fieldnames = header = [name.strip() for name in reader.fieldnames or []]
    missing = [field for field in INPUT_FIELDS if field not in header]
    if missing:
        raise ManifestError(f"{name} line 1: the CSV header must name the columns {', '.join(INPUT_FIELDS)} "
                            f"(optional: seed, output); missing {', '.join(missing)}, "
                            f"got {', '.join(header) or 'nothing'}")
    index = 0
    for record in reader:  # DictReader skips empty lines itself
        where = f"{name} line {reader.line_num}"
        if None in record:  # DictReader files cells past the header under the key None
            raise ManifestError(f"row {index} ({where}): {len(header) + len(record[None])} cells for {len(header)} "
                                "header columns")
        if all(value is None or not value.strip() for value in record.values()):
            continue  # a line of blank cells
        index += 1
        # A short row leaves the last columns None; an empty cell means "not given", as an absent JSON key.
        yield where, {key: value.strip() for key, value in record.items() if value is not None and value.strip()}


def parse_rows(
    records: Iterable[Mapping[str, Any] | tuple[str, Mapping[str, Any]]],
    *,
    base_dir: str | os.PathLike[str] = ".",
) -> list[Row]:
    """Check manifest records (dicts with ``image``, ``mask``, ``example``, optional ``seed`` and ``output``) into rows.

    Input paths are taken relative to ``base_dir``. A record may come as ``(where, record)`` so that messages say
    where it was read. Seeds are integer values (7, 7.0, a CSV cell "7" or "7.0"; not 7.5), outputs are relative
    paths ending in .png, .jpg or .jpeg that stay inside the output folder.

    Raises:
        ManifestError: a malformed record (the message names its row), no records at all, two rows with the same
            output, or a row whose output is one of the manifest's input files.
    """
    base_dir = Path(base_dir)
    rows: list[Row] = []
    for index, item in enumerate(records):
        where, record = item if isinstance(item, tuple) else ("", item)
        rows.append(_parse_row(index, where, record, base_dir))
    if not rows:
        raise ManifestError("the manifest holds no rows")
    _check_outputs(rows)
    return rows


def _parse_row(index: int, where: str, record: Mapping[str, Any], base_dir: Path) -> Row:
    name = f"row {index}" + (f" ({where})" if where else "")
    if not isinstance(record, Mapping):
        raise ManifestError(f"{name}: expected a mapping of fields, got {type(record).__name__}")
    unknown = sorted(str(key) for key in record if key not in FIELDS)
    if unknown:
        # Refused rather than ignored: a misspelt "seed" or "output" would silently change the results.
        raise ManifestError(f"{name}: unknown field(s) {', '.join(unknown)}; a row has {', '.join(FIELDS)}")
    paths = {}
    for field in INPUT_FIELDS:
        value = record.get(field)
        if not isinstance(value, str) or not value.strip():
            got = "nothing" if value is None else _shown(value)
            raise ManifestError(f"{name}: field {field!r} must be a file path, got {got}")
        paths[field] = base_dir / value
    seed = _parse_seed(record.get("seed"), name)
    output = _parse_output(record.get("output"), name, default=Path(record["image"]).stem + ".png")
    return Row(index, paths["image"], paths["mask"], paths["example"], output, seed, where)


def _parse_seed(value: Any, name: str) -> int | None:
    """An integer value, however written: 7, 7.0 and "7.0" (a CSV cell) alike; 7.5, "x" or a bool are refused."""
    if value is None:
        return None
    number = value
    if isinstance(value, (str, float)):  # a float converts exactly: its value, not a rounded one
        try:
            number = Decimal(value.strip() if isinstance(value, str) else value)
        except InvalidOperation:
            number = None
    if isinstance(number, Decimal):
        whole = number.is_finite() and number.adjusted() < 30 and number == number.to_integral_value()  # 1e99999: no
        number = int(number) if whole else None
    if not isinstance(number, int) or isinstance(number, bool) or not 0 <= number <= MAX_SEED:
        raise ManifestError(f"{name}: field 'seed' must be an integer from 0 to 2**64 - 1, got {_shown(value)}")
    return number


def _shown(value: Any) -> str:
    """A field's value as the user wrote it: strings quoted, numbers (JSON's exact decimals too) plain."""
    return str(value) if isinstance(value, Decimal) else repr(value)


def _parse_output(value: Any, name: str, *, default: str) -> Path:
    if value is None:
        value = default
    if not isinstance(value, str) or not value.strip():
        raise ManifestError(f"{name}: field 'output' must be a file name relative to the output folder, "
                            f"got {_shown(value)}")
    output = Path(os.path.normpath(value))
    if output.is_absolute() or output.parts[0] == "..":
        raise ManifestError(f"{name}: output {value!r} must stay inside the output folder (a relative path without ..)")
    if output.suffix.lower() not in OUTPUT_FORMATS:
        raise ManifestError(f"{name}: output {value!r} must end in {', '.join(OUTPUT_FORMATS)}")
    return output


def _check_outputs(rows: Sequence[Row]) -> None:
    first_with: dict[str, Row] = {}
    for row in rows:
        # Compared without case: macOS and Windows file systems take `X.png` and `x.png` for one file, so one row's
        # output would replace the other's, or be skipped as already painted.
        earlier = first_with.setdefault(str(row.output).casefold(), row)
        if earlier is not row and earlier.output == row.output:
            raise ManifestError(f"{row.name} and {earlier.name} both write {str(row.output)!r}; give one of them an "
                                "'output' field (the default is the image's file stem + .png)")
        if earlier is not row:
            raise ManifestError(f"{row.name} writes {str(row.output)!r} and {earlier.name} writes "
                                f"{str(earlier.output)!r}: names that differ only by case are one file on "
                                "case-insensitive file systems (macOS, Windows); give one of them another 'output'")


def check_outputs_are_not_inputs(rows: Sequence[Row], output_dir: str | os.PathLike[str]) -> None:
    """Refuse a row whose output file is one of the manifest's input files (skipping it would hide the mistake,
    ``overwrite`` would destroy an input).

    Raises:
        ManifestError: naming the row and the file.
    """
    inputs = {path.resolve(): (row, field) for row in rows for field in INPUT_FIELDS for path in [getattr(row, field)]}
    for row in rows:
        output = (Path(output_dir) / row.output).resolve()
        if output in inputs:
            other, field = inputs[output]
            raise ManifestError(f"{row.name}: its output {str(output)!r} is the {field} of {other.name}; "
                                "choose another output folder or 'output' name")


# --------------------------------------------------------------------------------------------------------------------
# Ranks and seeds
# --------------------------------------------------------------------------------------------------------------------


def row_seed(row: Row, seed: int) -> int:
    """The row's own ``seed`` field, else the run's base ``seed`` plus the row's index."""
    return row.seed if row.seed is not None else seed + row.index


def check_seeds(rows: Sequence[Row], seed: int) -> None:
    """Raise ``UsageError`` (a ValueError) if a row's seed (base + index) leaves torch's range 0 .. 2**64 - 1."""
    for row in rows:
        if not 0 <= row_seed(row, seed) <= MAX_SEED:
            raise UsageError(f"--seed {seed}: {row.name} would get seed {row_seed(row, seed)}, past 2**64 - 1")


def rows_of_rank(rows: Sequence[Row], ranks: Ranks) -> list[Row]:
    """Row ``i`` belongs to rank ``i mod world_size``: every rank gets an even share without talking to the others."""
    return [row for row in rows if row.index % ranks.world_size == ranks.rank]


# --------------------------------------------------------------------------------------------------------------------
# Painting
# --------------------------------------------------------------------------------------------------------------------


def save_image(image: Any, path: str | os.PathLike[str]) -> None:
    """Save a PIL image in the format its suffix names, atomically: a killed run leaves no half file under ``path``."""
    path = Path(path)
    write_atomically(path, lambda tmp: image.save(tmp, format=OUTPUT_FORMATS[path.suffix.lower()]))


def _load_row(row: Row) -> dict[str, Any]:
    inputs = {}
    for field in INPUT_FIELDS:
        try:
            inputs[field] = images.load_image(getattr(row, field))
        except OSError as err:
            raise OSError(f"{field}: {err}") from None
    if inputs["image"].size != inputs["mask"].size:
        raise ValueError(f"mask {str(row.mask)!r} is {'x'.join(map(str, inputs['mask'].size))} pixels but image "
                         f"{str(row.image)!r} is {'x'.join(map(str, inputs['image'].size))}; "
                         "they must be the same size")
    return inputs


def pending_rows(rows: Sequence[Row], output_dir: str | os.PathLike[str], *, ranks: Ranks = Ranks(),
                 overwrite: bool = False) -> list[Row]:
    """This rank's rows still to paint: those whose output does not exist yet (all of them with ``overwrite``)."""
    return [row for row in rows_of_rank(rows, ranks) if overwrite or not (Path(output_dir) / row.output).exists()]


def paint_manifest(
    pipe: PaintByExample,
    rows: Sequence[Row] | str | os.PathLike[str],
    output_dir: str | os.PathLike[str],
    *,
    options: PaintOptions = PaintOptions(),
    seed: int = 0,
    overwrite: bool = False,
    ranks: Ranks = Ranks(),
    progress: bool = True,
    on_outcome: Callable[[RowOutcome], None] | None = None,
) -> list[RowOutcome]:
    """Paint the rows of a manifest (``rows``: from ``read_manifest``/``parse_rows``, or a manifest path) into
    ``output_dir``, one row at a time, and return one outcome per row of this rank, in row order.

    Each row is painted exactly as ``pipe(example, image, mask, options=options,
    generator=torch.Generator().manual_seed(s))`` (``options``: the painting options, ``pbe.PaintOptions``) with
    ``s`` = its ``seed`` field, else ``seed`` + its index, so its result equals ``pbe paint`` with that seed and does
    not depend on the other rows or on ``ranks``. A row that fails (missing or corrupt file, size mismatch, out of
    memory, ...) is reported in its outcome and the run goes on. Rows whose output exists are skipped unless
    ``overwrite``. With ``ranks`` this process only handles rows ``i`` with ``i mod world_size == rank``.
    ``on_outcome`` is called after each row (the CLI prints failures with it); ``progress`` shows a bar over rows
    (with one rank only: several ranks share one stderr, so the CLI prints a line per row instead).

    Raises:
        ManifestError: a malformed manifest, or a row whose output is an input file (before anything is painted).
        ValueError: a seed out of range, or (``OptionError``) a step count or ``eta`` the sampler cannot run (before
            anything is painted).
    """
    if isinstance(rows, (str, os.PathLike)):
        rows = read_manifest(rows)
    output_dir = Path(output_dir)
    check_seeds(rows, seed)
    check_outputs_are_not_inputs(rows, output_dir)
    if not isinstance(options, PaintOptions):
        raise TypeError(f"options: expected a pbe.PaintOptions, got {type(options).__name__}")
    # Refused once here rather than in every row; ``pipe`` may be any callable of the pipeline's call shape.
    options.check_run(options.make_scheduler(getattr(pipe, "scheduler_config", None)))
    outcomes: dict[int, RowOutcome] = {}
    pending = pending_rows(rows, output_dir, ranks=ranks, overwrite=overwrite)
    pending_indices = {row.index for row in pending}
    for row in rows_of_rank(rows, ranks):
        if row.index not in pending_indices:
            outcomes[row.index] = RowOutcome(row, "skipped", row_seed(row, seed), output_dir / row.output)
            if on_outcome is not None:
                on_outcome(outcomes[row.index])

    # Several ranks share one stderr: their bars, redrawn in place with carriage returns and no newline, would run
    # into each other's lines (and into the summaries). There each row's outcome is a whole line (``on_outcome``).
    bar = tqdm(pending, disable=not progress or ranks.world_size > 1, desc="rows", unit="row", dynamic_ncols=True)
    for row in bar:
        row_seed_ = row_seed(row, seed)
        output = output_dir / row.output
        try:
            inputs = _load_row(row)
            painted = pipe(inputs["example"], inputs["image"], inputs["mask"], options=options,
                           generator=torch.Generator().manual_seed(row_seed_), progress=False).images[0]
            save_image(painted, output)
            outcome = RowOutcome(row, "painted", row_seed_, output)
        except Exception as err:  # noqa: BLE001 -- one bad row must not end a run of thousands; the outcome says why
            if isinstance(err, torch.OutOfMemoryError) and torch.cuda.is_available():
                torch.cuda.empty_cache()  # let the next (smaller) row use the memory this one could not get
            message = " ".join(str(err).split()) or type(err).__name__
            outcome = RowOutcome(row, "failed", row_seed_, output, f"{type(err).__name__}: {message}")
        outcomes[row.index] = outcome
        if on_outcome is not None:
            on_outcome(outcome)
    bar.close()
    return [outcomes[index] for index in sorted(outcomes)]


def count(outcomes: Iterable[RowOutcome]) -> dict[str, int]:
    """``{"painted": ..., "skipped": ..., "failed": ...}``."""
    counts = dict.fromkeys(STATUSES, 0)
    for outcome in outcomes:
        counts[outcome.status] += 1
    return counts


# --------------------------------------------------------------------------------------------------------------------
# Several ranks: one exchange at the end
# --------------------------------------------------------------------------------------------------------------------
# The ranks paint without talking to each other. They meet once at the end to add up their counts, because torchrun
# stops every rank as soon as one exits with a non-zero status: a rank with a failed row must not exit before the
# others are done, and with the totals every rank exits with the same status.

RANK_TIMEOUT = timedelta(days=30)  # how long a finished rank waits for the slowest one


def join_ranks(ranks: Ranks) -> None:
    """With several ranks, join torch's process group (gloo, at the launcher's MASTER_ADDR:MASTER_PORT).

    Raises:
        RuntimeError: this PyTorch has no torch.distributed, or the launcher's rendezvous cannot be reached.
    """
    if ranks.world_size == 1 or (dist.is_available() and dist.is_initialized()):
        return
    if not dist.is_available():
        raise RuntimeError(f"WORLD_SIZE={ranks.world_size}: this PyTorch build has no torch.distributed")
    dist.init_process_group("gloo", rank=ranks.rank, world_size=ranks.world_size, timeout=RANK_TIMEOUT)


def total_counts(counts: Mapping[str, int], ranks: Ranks) -> dict[str, int]:
    """The counts summed over all ranks (waits for the slowest rank); then leaves the process group."""
    if ranks.world_size == 1:
        return dict(counts)
    totals = torch.tensor([counts[status] for status in STATUSES], dtype=torch.int64)
    dist.all_reduce(totals)
    dist.destroy_process_group()
    return dict(zip(STATUSES, totals.tolist()))

