"""``pbe serve``'s HTTP API against a real uvicorn server (httpx over TCP): painting as PNG and as events, equal to the
pipeline bit for bit; the refusals (401, 413, 415, 422, 503) and that they come before the work; cancellation at the
next step and queued requests dropped when their client goes away; nothing left on disk."""

from __future__ import annotations

import io
import shlex
import socket
import struct
import time
import zlib
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import PIL.Image
import pytest
import torch

from conftest import HUB_SMALL
from pbe import PaintByExample, images
from pbe.options import ModelOptions, PaintOptions
from pbe.schedulers import SCHEDULERS, make_scheduler
from pbe.serve import Limits, create_app
from serving import events, files, free_port, pictures, png, running, serve_command, stop, wait_until_serving

LONG = "600"  # steps of a painting that is still running when the test acts (tens of ms per step here)


class Recorder:
    """A pipeline wrapper that keeps what the server handed over (to see the mask it received)."""

    def __init__(self, pipe: PaintByExample) -> None:
        self.pipe, self.scheduler_config = pipe, pipe.scheduler_config
        self.calls: list[dict[str, Any]] = []

    def __call__(self, example: Any, image: Any, mask: Any, **keywords: Any) -> Any:
        self.calls.append({"example": example, "image": image, "mask": mask, **keywords})
        return self.pipe(example, image, mask, **keywords)


@pytest.fixture(scope="module")
def pipe() -> PaintByExample:
    return PaintByExample.from_pretrained(HUB_SMALL, dtype=torch.float32, device="cpu")


@pytest.fixture(scope="module")
def model() -> ModelOptions:
    return ModelOptions(checkpoint=str(HUB_SMALL), device="cpu", dtype="fp32")


@pytest.fixture(scope="module")
def served(pipe: PaintByExample, model: ModelOptions) -> Iterator[tuple[str, Any, Recorder]]:
    """An open server (no token) with a queue of 2: (URL, app, recorder)."""
    recorder = Recorder(pipe)
    app = create_app(recorder, model=model, limits=Limits(queue=2, max_pixels=256 * 256, max_upload_bytes=2_000_000))
    with running(app) as url:
        yield url, app, recorder


@pytest.fixture()
def client(served: tuple[str, Any, Recorder]) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=served[0], timeout=60) as http:
        yield http


def _wait_idle(app: Any) -> None:
    """Until the worker has nothing running or waiting (a cancelled painting may take one more step)."""
    deadline = time.monotonic() + 30
    while app.state.painter.busy or app.state.painter.waiting:
        assert time.monotonic() < deadline, "the worker did not become idle"
        time.sleep(0.01)


def _reference(pipe: PaintByExample, inputs: dict[str, PIL.Image.Image], seed: int, **options: Any) -> np.ndarray:
    """What the pipeline paints from these pictures read back from PNG files as ``pbe paint`` reads them."""
    read = {name: images.load_image(PIL.Image.open(io.BytesIO(png(image)))) for name, image in inputs.items()}
    result = pipe(read["example"], read["image"], read["mask"], generator=torch.Generator().manual_seed(seed),
                  progress=False, **PaintOptions(**options).pipeline_keywords())
    return np.asarray(result.images[0])


# ---- painting -------------------------------------------------------------------------------------------------------


def test_paint_answers_a_png_equal_to_the_pipeline_with_the_same_seed_and_options(
        served: tuple[str, Any, Recorder], client: httpx.Client, pipe: PaintByExample) -> None:
    _, _, recorder = served
    inputs = pictures((64, 48))
    form = {"steps": "2", "scheduler": "ddim", "guidance": "3.5", "seed": "1234", "keep_unmasked": "true",
            "mask_blur": "2"}
    response = client.post("/api/paint", files=files(inputs), data=form)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    assert response.headers["x-pbe-seed"] == "1234"
    painted = np.asarray(PIL.Image.open(io.BytesIO(response.content)))
    assert painted.shape == (48, 64, 3)
    expected = _reference(pipe, inputs, 1234, steps=2, scheduler="ddim", guidance=3.5, keep_unmasked=True,
                          mask_blur=2.0)
    assert np.array_equal(painted, expected)
    # The server handed the pipeline the mask that was uploaded, pixel for pixel.
    assert np.array_equal(np.asarray(recorder.calls[-1]["mask"]), np.asarray(inputs["mask"]))
    command = shlex.split(response.headers["x-pbe-command"])
    assert command[:2] == ["pbe", "paint"]
    for flag, value in {"--seed": "1234", "--steps": "2", "--scheduler": "ddim", "--guidance": "3.5",
                        "--mask-blur": "2.0", "--checkpoint": str(HUB_SMALL), "--image": "image.png",
                        "--mask": "mask.png", "--example": "example.png", "-o": "painted.png"}.items():
        assert command[command.index(flag) + 1] == value
    assert "--keep-unmasked" in command


def test_the_repeat_command_run_by_pbe_paint_gives_the_same_picture(
        client: httpx.Client, tmp_path: Any) -> None:
    from pbe import cli

    inputs = pictures((64, 64), seed=3)
    response = client.post("/api/paint", files=files(inputs), data={"steps": "2", "seed": "99"})
    assert response.status_code == 200, response.text
    for name, image in inputs.items():
        image.save(tmp_path / f"{name}.png")
    words = shlex.split(response.headers["x-pbe-command"])
    words = [str(tmp_path / word) if word.endswith(".png") else word for word in words]
    assert cli.main(words[1:]) == 0
    assert np.array_equal(np.asarray(PIL.Image.open(tmp_path / "painted.png").convert("RGB")),
                          np.asarray(PIL.Image.open(io.BytesIO(response.content)).convert("RGB")))


def test_paint_as_events_reports_each_step_and_ends_with_the_same_picture(
        client: httpx.Client, pipe: PaintByExample) -> None:
    inputs = pictures((56, 64), seed=1)
    with client.stream("POST", "/api/paint", files=files(inputs), data={"steps": "3", "seed": "7"},
                       headers={"Accept": "text/event-stream"}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        received = list(events(response))
    names = [name for name, _ in received]
    assert names == ["queued", "started", "progress", "progress", "progress", "done"]
    assert received[0][1] == {"position": 0}
    assert received[1][1] == {"steps": 3, "seed": 7}
    assert [data for name, data in received if name == "progress"] == [
        {"step": i, "steps": 3, "item": 1, "items": 1} for i in (1, 2, 3)]
    done = received[-1][1]
    assert (done["width"], done["height"], done["seed"]) == (56, 64, 7)
    assert "--seed 7" in done["command"] and "--steps 3" in done["command"]
    header, _, data = done["image"].partition(",")
    assert header == "data:image/png;base64"
    import base64

    painted = np.asarray(PIL.Image.open(io.BytesIO(base64.b64decode(data))))
    assert painted.shape == (64, 56, 3)
    assert np.array_equal(painted, _reference(pipe, inputs, 7, steps=3))


@pytest.mark.parametrize("kind", ["JPEG", "WEBP", "BMP", "GIF"])
def test_every_accepted_format_is_read(client: httpx.Client, kind: str) -> None:
    encoded = io.BytesIO()
    pictures(seed=2)["example"].save(encoded, format=kind)
    response = client.post("/api/paint", files=files(example=encoded.getvalue()), data={"steps": "1"})
    assert response.status_code == 200, response.text


def test_pictures_are_turned_upright_by_their_exif_orientation(served: tuple[str, Any, Recorder],
                                                               client: httpx.Client) -> None:
    inputs = pictures((64, 48), seed=4)
    exif = PIL.Image.Exif()
    exif[0x0112] = 6  # orientation: shown rotated 90 degrees clockwise, so upright it is 48 wide and 64 high
    sideways = io.BytesIO()
    inputs["image"].save(sideways, format="JPEG", exif=exif)
    upright_mask = png(PIL.Image.new("L", (48, 64), 255))
    response = client.post("/api/paint", files=files(inputs, image=sideways.getvalue(), mask=upright_mask),
                           data={"steps": "1"})
    assert response.status_code == 200, response.text
    assert PIL.Image.open(io.BytesIO(response.content)).size == (48, 64)
    assert served[2].calls[-1]["image"].size == (48, 64)


def test_an_absent_or_empty_seed_is_a_fresh_one_reported_back(client: httpx.Client) -> None:
    seeds = set()
    for form in ({"steps": "1"}, {"steps": "1", "seed": ""}):
        response = client.post("/api/paint", files=files(), data=form)
        assert response.status_code == 200, response.text
        seeds.add(int(response.headers["x-pbe-seed"]))
        assert f"--seed {response.headers['x-pbe-seed']}" in response.headers["x-pbe-command"]
    assert len(seeds) == 2


def test_health_names_the_dtype_as_the_flag_does_without_model_options(pipe: PaintByExample) -> None:
    with running(create_app(pipe)) as url:
        assert httpx.get(f"{url}/api/health").json()["model"] == {"checkpoint": None, "device": "cpu",
                                                                   "dtype": "fp32"}


def test_health_and_the_options_schema(client: httpx.Client, model: ModelOptions, pipe: PaintByExample) -> None:
    health = client.get("/api/health").json()
    assert health["status"] == "ok"
    assert health["model"] == {"checkpoint": str(HUB_SMALL), "device": "cpu", "dtype": "fp32"}
    assert health["queue"] == {"waiting": 0, "limit": 2, "busy": False}
    options = client.get("/api/options").json()
    assert options["options"] == PaintOptions.describe()
    assert options["schedulers"] == {name: {"max_steps": make_scheduler(name, pipe.scheduler_config).max_steps}
                                     for name in SCHEDULERS}
    assert options["limits"] == {"max_upload_bytes": 2_000_000, "max_pixels": 256 * 256}


def test_the_page_and_the_offline_api_page(client: httpx.Client) -> None:
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert client.get("/static/index.html").text == page.text
    docs = client.get("/docs")
    assert docs.status_code == 200 and "/openapi.json" in docs.text
    assert "https://" not in docs.text and "cdn" not in docs.text.lower()  # works offline


def test_openapi_lists_paint_with_its_form_fields(client: httpx.Client) -> None:
    spec = client.get("/openapi.json").json()
    assert {"/api/paint", "/api/health", "/api/options"} <= spec["paths"].keys()
    paint = spec["paths"]["/api/paint"]["post"]
    schema = paint["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert set(schema["properties"]) == {"image", "mask", "example", "seed"} | {f["name"] for f in
                                                                              PaintOptions.describe()}
    assert schema["properties"]["steps"]["default"] == PaintOptions().steps
    assert {"200", "401", "413", "415", "422", "503"} <= paint["responses"].keys()


# ---- refusals -------------------------------------------------------------------------------------------------------


def test_a_token_is_required_when_set(pipe: PaintByExample) -> None:
    with running(create_app(pipe, token="s3cret")) as url, httpx.Client(base_url=url, timeout=60) as http:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            response = http.post("/api/paint", files=files(), data={"steps": "1"}, headers=headers)
            assert response.status_code == 401
            assert "token" in response.json()["detail"]
        assert http.get("/api/health").status_code == 200
        ok = http.post("/api/paint", files=files(), data={"steps": "1"}, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200


def _raw_request(url: str, head: str, chunks: Iterator[bytes] | None = None) -> tuple[int, bytes]:
    """Send a request by hand (to declare a size, or to send chunks), then read the answer's status and body."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head.encode())
        try:
            for chunk in chunks or ():
                sock.sendall(chunk)
        except OSError:  # the server answered and closed before the whole body was sent
            pass
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
            if b"\r\n\r\n" in answer and b'"}' in answer:
                break
    status = int(answer.split(b" ", 2)[1])
    return status, answer.partition(b"\r\n\r\n")[2]


def test_an_upload_over_the_limit_is_refused_413_before_it_is_read(served: tuple[str, Any, Recorder]) -> None:
    url = served[0]
    declared = ("POST /api/paint HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                "Content-Length: 1000000000\r\n\r\n")
    status, body = _raw_request(url, declared)  # nothing of the gigabyte is ever sent
    assert status == 413 and b"max_upload_bytes" in body and b"1000000000" in body
    sent = []

    def chunked() -> Iterator[bytes]:
        part = b'--b\r\nContent-Disposition: form-data; name="image"; filename="a.png"\r\n\r\n'
        yield f"{len(part):x}\r\n".encode() + part + b"\r\n"
        for _ in range(400):  # 400 x 64 KiB of one file part: far over the 2 MB limit
            sent.append(1)
            yield b"10000\r\n" + b"x" * 0x10000 + b"\r\n"

    head = ("POST /api/paint HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
            "Transfer-Encoding: chunked\r\n\r\n")
    status, body = _raw_request(url, head, chunked())
    assert status == 413 and b"max_upload_bytes" in body
    assert len(sent) < 400  # refused while it arrived


def test_a_client_gone_while_uploading_gives_its_place_back(served: tuple[str, Any, Recorder],
                                                            client: httpx.Client) -> None:
    host, port = served[0].removeprefix("http://").split(":")
    for _ in range(3):  # more than the queue's 2 places: each must come back
        with socket.create_connection((host, int(port))) as sock:
            sock.sendall(b"POST /api/paint HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                         b"Content-Length: 100000\r\n\r\n--b\r\n")
            time.sleep(0.2)
    deadline = time.monotonic() + 10
    while client.get("/api/health").json()["queue"]["waiting"]:
        assert time.monotonic() < deadline, "a place stayed taken"
        time.sleep(0.05)
    assert client.post("/api/paint", files=files(), data={"steps": "1"}).status_code == 200


@pytest.mark.parametrize(("data", "found"), [(b"just some text\n", "text"), (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj",
                                                                                "a PDF document")])
def test_a_file_that_is_not_an_accepted_picture_is_refused_415(client: httpx.Client, data: bytes, found: str) -> None:
    response = client.post("/api/paint", files=files(example=data), data={"steps": "1"})
    assert response.status_code == 415
    detail = response.json()["detail"]
    assert detail.startswith("example: ") and found in detail and "PNG" in detail


def test_a_picture_of_another_format_is_refused_415_naming_it(client: httpx.Client) -> None:
    tiff = io.BytesIO()
    pictures()["image"].save(tiff, format="TIFF")
    response = client.post("/api/paint", files=files(image=tiff.getvalue()), data={"steps": "1"})
    assert response.status_code == 415
    assert response.json()["detail"].startswith("image: ") and "TIFF" in response.json()["detail"]


def _claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` pixels (a decompression bomb's shape)."""
    data = bytearray(png(PIL.Image.new("L", (1, 1))))
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


@pytest.mark.parametrize(("form", "replace", "expected"), [
    ({"steps": "abc"}, {}, "steps: expected a positive integer, got 'abc'"),
    ({"steps": "0"}, {}, "steps: expected a positive integer, got 0"),
    ({"scheduler": "nope"}, {}, "scheduler: expected one of pndm"),
    ({"mask_blur": "3"}, {}, "mask_blur only applies with keep_unmasked"),
    ({"keep_unmasked": "maybe"}, {}, "keep_unmasked: expected true or false, got 'maybe'"),
    ({"guidance": "nan"}, {}, "guidance: expected a finite number"),
    ({"steps": "2", "bogus": "1"}, {}, "bogus: not a field of /api/paint"),
    ({"seed": str(2**64)}, {}, "seed: expected an integer from 0 to 2**64 - 1"),
    ({"seed": "-1"}, {}, "seed: expected an integer from 0 to 2**64 - 1"),
    ({}, {"image": png(pictures()["image"])[:300]}, "image: a corrupt PNG picture"),
    ({}, {"mask": _claiming(30000, 30000)}, "mask: too many pixels"),
    ({}, {"example": _claiming(300, 300)}, "example: 300x300 pixels is 90000 pixels, more than the limit of 65536"),
    ({}, {"mask": png(PIL.Image.new("L", (64, 32)))}, "mask: 64x32 pixels but image is 64x64"),
])
def test_bad_fields_and_pictures_are_refused_422_naming_them(
        served: tuple[str, Any, Recorder], client: httpx.Client, form: dict[str, str], replace: dict[str, bytes],
        expected: str) -> None:
    recorder = served[2]
    before = len(recorder.calls)
    response = client.post("/api/paint", files=files(**replace), data=form)
    assert response.status_code == 422, response.text
    assert expected in response.json()["detail"]
    assert len(recorder.calls) == before  # refused before anything ran


def test_a_step_count_the_sampler_cannot_run_is_refused(client: httpx.Client, pipe: PaintByExample) -> None:
    too_many = make_scheduler("pndm", pipe.scheduler_config).max_steps + 1
    response = client.post("/api/paint", files=files(), data={"steps": str(too_many)})
    assert response.status_code == 422 and response.json()["detail"].startswith("steps: ")


# ---- the queue, cancellation ----------------------------------------------------------------------------------------


def _first_event(received: Iterator[tuple[str, dict[str, Any]]], wanted: str) -> dict[str, Any]:
    """The next ``wanted`` event of a stream's events. Take the iterator, not the response: a dropped iterator of
    httpx's closes the connection, which cancels the request."""
    for name, data in received:
        if name == wanted:
            return data
    raise AssertionError(f"no {wanted} event")


def test_a_full_queue_answers_503_with_retry_after_before_reading_the_uploads_and_positions_move_up(
        served: tuple[str, Any, Recorder], pipe: PaintByExample) -> None:
    url, app, _ = served
    sse = {"Accept": "text/event-stream"}
    with httpx.Client(base_url=url, timeout=60) as http:
        with http.stream("POST", "/api/paint", files=files(), data={"steps": LONG}, headers=sse) as running_one:
            first_events = events(running_one)
            _first_event(first_events, "progress")
            with http.stream("POST", "/api/paint", files=files(), data={"steps": "1"}, headers=sse) as second, \
                    http.stream("POST", "/api/paint", files=files(), data={"steps": "1"}, headers=sse) as third:
                second_events, third_events = events(second), events(third)
                assert _first_event(second_events, "queued") == {"position": 0}
                assert _first_event(third_events, "queued") == {"position": 1}
                assert http.get("/api/health").json()["queue"] == {"waiting": 2, "limit": 2, "busy": True}
                # Not a picture at all: still 503, so the uploads were not looked at.
                refused = http.post("/api/paint", files=files(image=b"not a picture"), data={"steps": "1"})
                assert refused.status_code == 503
                # An estimate from the measured time per step (tens of ms; more while uploads compete for the CPU),
                # not a guess of a second per step (599).
                assert 1 <= int(refused.headers["retry-after"]) <= 300
                assert "queue is full" in refused.json()["detail"]
                second.close()  # the one ahead leaves: the third hears that it is next
                assert _first_event(third_events, "queued") == {"position": 0}
    _wait_idle(app)


def test_a_disconnected_stream_stops_its_painting_at_the_next_step_and_the_next_runs_at_once(
        served: tuple[str, Any, Recorder]) -> None:
    url, app, _ = served
    painter = app.state.painter
    with httpx.Client(base_url=url, timeout=60) as http:
        with http.stream("POST", "/api/paint", files=files(), data={"steps": LONG},
                         headers={"Accept": "text/event-stream"}) as response:
            received = events(response)
            assert _first_event(received, "progress")["step"] == 1
        # The stream is closed: the painting must stop within a step or two.
        start = time.monotonic()
        answer = http.post("/api/paint", files=files(), data={"steps": "2"})
        assert answer.status_code == 200
        waited = time.monotonic() - start
    cancelled = [job for job in painter.finished if job.steps == int(LONG)][-1]
    assert cancelled.outcome == "cancelled"
    assert cancelled.steps_run <= 3, cancelled.steps_run
    assert waited < 10  # 600 steps would take far longer


def test_a_dropped_plain_request_stops_its_painting(served: tuple[str, Any, Recorder]) -> None:
    url, app, _ = served
    painter = app.state.painter
    before = len(painter.finished)
    with pytest.raises(httpx.ReadTimeout), httpx.Client(base_url=url, timeout=httpx.Timeout(60, read=2)) as http:
        http.post("/api/paint", files=files(), data={"steps": LONG})
    _wait_idle(app)
    job = list(painter.finished)[before]
    assert job.outcome == "cancelled" and 0 < job.steps_run < int(LONG)


def test_a_queued_request_whose_client_goes_away_is_dropped_without_running(
        served: tuple[str, Any, Recorder]) -> None:
    url, app, recorder = served
    painter = app.state.painter
    sse = {"Accept": "text/event-stream"}
    with httpx.Client(base_url=url, timeout=60) as http:
        with http.stream("POST", "/api/paint", files=files(), data={"steps": LONG}, headers=sse) as first:
            first_events = events(first)
            _first_event(first_events, "progress")
            with http.stream("POST", "/api/paint", files=files(), data={"steps": "5", "seed": "4242"},
                             headers=sse) as queued:
                queued_events = events(queued)
                assert _first_event(queued_events, "queued") == {"position": 0}
                assert painter.waiting == 1
            deadline = time.monotonic() + 10
            while painter.waiting:
                assert time.monotonic() < deadline, "the queued request was not dropped"
                time.sleep(0.01)
    _wait_idle(app)
    dropped = [job for job in painter.finished if job.seed == 4242]
    assert [(job.outcome, job.steps_run) for job in dropped] == [("dropped", 0)]
    assert not any(call["generator"].initial_seed() == 4242 for call in recorder.calls)


# ---- nothing on disk ------------------------------------------------------------------------------------------------


def test_nothing_is_left_in_tmpdir_after_paintings_refusals_and_a_cancel(tmp_path: Any) -> None:
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    port = free_port()
    server = serve_command("--checkpoint", str(HUB_SMALL), "--device", "cpu", "--dtype", "fp32", "--port", str(port),
                           "--max-upload-mb", "8", env={"TMPDIR": str(tmp)})
    try:
        wait_until_serving(server)
        big = pictures(seed=5)
        # A 600x600 noise example, ~1.1 MB of PNG: past starlette's 1 MB spooling threshold (CLIP shrinks it to 224).
        big["example"] = PIL.Image.fromarray(np.random.default_rng(5).integers(0, 256, (600, 600, 3), dtype=np.uint8))
        assert len(png(big["example"])) > 1024 * 1024
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as http:
            assert http.post("/api/paint", files=files(big), data={"steps": "1"}).status_code == 200
            assert http.post("/api/paint", files=files(), data={"steps": "1"}).status_code == 200
            assert http.post("/api/paint", files=files(image=b"text"), data={}).status_code == 415
            assert http.post("/api/paint", files=files(), data={"steps": "x"}).status_code == 422
            with http.stream("POST", "/api/paint", files=files(big), data={"steps": LONG},
                             headers={"Accept": "text/event-stream"}) as response:
                received = events(response)
                _first_event(received, "progress")
            assert http.post("/api/paint", files=files(), data={"steps": "1"}).status_code == 200
            assert list(tmp.iterdir()) == []
    finally:
        stop(server)
    assert list(tmp.iterdir()) == []


# ---- failures while painting ----------------------------------------------------------------------------------------


def test_a_failure_while_painting_is_reported_and_the_server_goes_on(pipe: PaintByExample) -> None:
    def failing(example: Any, image: Any, mask: Any, **keywords: Any) -> Any:
        if keywords["generator"].initial_seed() == 13:
            keywords["callback"](0, 981, torch.zeros(1))
            raise RuntimeError("the latents hold NaN or inf after denoising step 1 of 2")
        return pipe(example, image, mask, **keywords)

    failing.scheduler_config = pipe.scheduler_config  # type: ignore[attr-defined]
    with running(create_app(failing)) as url, httpx.Client(base_url=url, timeout=60) as http:
        with http.stream("POST", "/api/paint", files=files(), data={"steps": "2", "seed": "13"},
                         headers={"Accept": "text/event-stream"}) as response:
            received = list(events(response))
        assert [name for name, _ in received] == ["queued", "started", "progress", "error"]
        assert received[-1][1] == {"status": 500, "detail": "the latents hold NaN or inf after denoising step 1 of 2"}
        plain = http.post("/api/paint", files=files(), data={"steps": "2", "seed": "13"})
        assert plain.status_code == 500 and "NaN" in plain.json()["detail"]
        assert http.post("/api/paint", files=files(), data={"steps": "2", "seed": "14"}).status_code == 200
