"""``backward-lens serve`` as a user runs it: prints the address, answers, stops on Ctrl+C."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import urllib.request

import pytest

from backward_lens.cli import build_parser


def test_serve_help_teaches() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    text = sub.choices["serve"].format_help()  # type: ignore[union-attr]
    for needle in ("--host", "--port", "--model", "127.0.0.1", "Example", "never a path"):
        assert needle in text


def test_serve_refuses_a_bad_port(capsys: pytest.CaptureFixture[str]) -> None:
    from backward_lens.cli import main

    assert main(["serve", "--port", "70000"]) == 2
    assert "--port must be from 0 to 65535" in capsys.readouterr().err


def _interruptible() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.slow
def test_serve_prints_the_address_and_stops_on_interrupt() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-m", "backward_lens.cli", "serve", "--port", "0", "--quiet"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # Ctrl-C in a terminal: a test suite started in the background of a non-interactive shell
        # (nohup ... &) inherits SIGINT ignored, and so would the server
        preexec_fn=_interruptible,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert "backward-lens viewer for smollm2-135m: http://127.0.0.1:" in line, line
        url = line.split(": ", 1)[1].split()[0]
        with urllib.request.urlopen(url + "api/config", timeout=30) as resp:
            assert json.load(resp)["models"] == ["smollm2-135m", "gemma3-270m"]
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        assert "stopped" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
