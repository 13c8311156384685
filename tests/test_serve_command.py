"""``pbe serve`` as a command: refusals before the model loads (exit status 2), the warning on a non-loopback host,
the token in the printed URL, and a real server process that answers and ends with 130 on SIGTERM."""

from __future__ import annotations

import signal
import socket
import time

import httpx
import pytest

from conftest import HUB_SMALL
from pbe import cli
from pbe.pipeline import PaintByExample
from serving import events, files, free_port, serve_command, stop, wait_until_serving

MODEL = ["--checkpoint", str(HUB_SMALL), "--device", "cpu", "--dtype", "fp32"]


@pytest.fixture()
def no_loading(monkeypatch: pytest.MonkeyPatch) -> None:
    """Refusals come before the model loads: loading fails the test."""
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr(PaintByExample, "from_pretrained", refuse)


@pytest.mark.usefixtures("no_loading")
@pytest.mark.parametrize(("flags", "expected"), [
    (["--host", "0.0.0.0"], "error: --host 0.0.0.0: not a loopback address"),
    (["--host", "192.168.1.20"], "add --allow-remote"),
    (["--queue", "0"], "error: --queue: expected a positive integer, got 0"),
    (["--max-pixels", "-5"], "error: --max-pixels: expected a positive integer, got -5"),
    (["--max-upload-mb", "0"], "error: --max-upload-mb: expected a positive number of MiB, got 0.0"),
    (["--port", "70000"], "error: --port: expected a port from 0 to 65535, got 70000"),
    (["--token", ""], "error: --token: expected a non-empty text"),
    (["--steps", "3"], "unrecognized arguments: --steps"),  # painting options come with each request
])
def test_bad_flags_are_refused_before_loading(flags: list[str], expected: str,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    try:
        status = cli.main(["serve", *MODEL, "--port", str(free_port()), *flags])
    except SystemExit as exit_:  # argparse's own refusals
        status = exit_.code
    assert status == 2
    assert expected in capsys.readouterr().err


@pytest.mark.usefixtures("no_loading")
def test_a_port_in_use_is_refused_before_loading(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert cli.main(["serve", *MODEL, "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert f"error: --port: cannot listen on 127.0.0.1:{port}" in err and "in use" in err


def test_loopback_serves_without_a_warning(monkeypatch: pytest.MonkeyPatch,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    def stop_at_loading(*args: object, **kwargs: object) -> None:
        raise RuntimeError("stopped at loading")  # the warning would have been printed by now

    monkeypatch.setattr(PaintByExample, "from_pretrained", stop_at_loading)
    assert cli.main(["serve", *MODEL, "--port", str(free_port())]) == 1
    err = capsys.readouterr().err
    assert "error: stopped at loading" in err and "warning" not in err


def test_a_remote_host_warns_prints_the_token_url_serves_and_sigterm_stops_a_painting_with_130() -> None:
    port = free_port()
    server = serve_command(*MODEL, "--host", "0.0.0.0", "--allow-remote", "--port", str(port), "--token", "tok3n")
    try:
        printed = wait_until_serving(server)
        assert "warning: serving on 0.0.0.0" in printed and "anyone" in printed
        assert f"serving on http://0.0.0.0:{port}/#token=tok3n" in printed
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
            health = http.get("/api/health").json()
            assert health["status"] == "ok" and health["model"]["checkpoint"] == str(HUB_SMALL)
            assert http.post("/api/paint").status_code == 401
            with http.stream("POST", "/api/paint", files=files(), data={"steps": "900"},
                             headers={"Accept": "text/event-stream", "Authorization": "Bearer tok3n"}) as response:
                received = events(response)
                assert next(name for name, _ in received if name == "progress")
                start = time.monotonic()
                server.send_signal(signal.SIGTERM)  # mid-painting: the painting stops, the stream ends, the server too
                rest = list(received)
                assert server.wait(30) == 130
        assert time.monotonic() - start < 10  # 900 steps would take far longer
        assert [name for name, _ in rest if name != "progress"] == ["error"]
        assert rest[-1][1]["status"] == 503
        assert "interrupted" in server.stderr.read()
    finally:
        stop(server)


def test_the_token_can_come_from_the_environment_out_of_the_process_list(monkeypatch: pytest.MonkeyPatch) -> None:
    from pbe.serve import command

    seen: dict[str, object] = {}

    def serve(sock: socket.socket, args: object, *rest: object) -> int:
        seen["token"] = args.token  # type: ignore[attr-defined]
        return 0

    monkeypatch.setattr(command, "_serve", serve)
    monkeypatch.setenv(command.TOKEN_VARIABLE, "s3cret")
    assert cli.main(["serve", *MODEL, "--port", str(free_port())]) == 0
    assert seen["token"] == "s3cret"
    assert cli.main(["serve", *MODEL, "--port", str(free_port()), "--token", "flag"]) == 0
    assert seen["token"] == "flag"  # the flag wins
