"""Reliability probes (issue 17) against a real `headwise serve` that this script starts:
/health latency while a large body is refused (or tokenized) and while streams run, and
a SIGTERM drain with streams that outlive --drain-timeout.

    python -m headwise.loadtest.reliability big-body --body-mb 5 --repeat 20
    python -m headwise.loadtest.reliability streams --streams 32 --max-tokens 64
    python -m headwise.loadtest.reliability drain --streams 4 --max-tokens 200 --drain-timeout 5

Arguments after `--` go to `headwise serve` (e.g. `-- --model DIR --max-request-bytes 8388608`).
Each probe ends with one summary line of what it measured."""

from __future__ import annotations

import argparse
import http.client
import json
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx


def start_server(serve_args: list[str]) -> tuple[subprocess.Popen, str]:
    """`headwise serve` on a free port, once /health answers 200."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "headwise.clients.cli",
            "serve",
            "--port",
            str(port),
            "--log-level",
            "warning",
            *serve_args,
        ]
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"headwise serve exited with status {proc.returncode} during startup")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("headwise serve was not ready within 300 s")


class HealthProbe(threading.Thread):
    """GET /health on a fresh connection every `interval` s, as an orchestrator's probe
    does; `samples` holds (start time, status or None when refused, latency s)."""

    def __init__(self, url: str, interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.interval = interval
        self.samples: list[tuple[float, int | None, float]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        host, port = self.url.removeprefix("http://").split(":")
        while not self.stop.is_set():
            started = time.monotonic()
            # http.client: a new connection costs the probe microseconds (an httpx client
            # builds an SSL context first, tens of ms that are not the server's)
            connection = http.client.HTTPConnection(host, int(port), timeout=10)
            try:
                connection.request("GET", "/health")
                status: int | None = connection.getresponse().status
            except OSError:
                status = None
            finally:
                connection.close()
            self.samples.append((started, status, time.monotonic() - started))
            time.sleep(max(0.0, self.interval - (time.monotonic() - started)))

    def latencies_ms(self, windows: list[tuple[float, float]] | None = None) -> list[float]:
        """Latencies of answered probes that started inside one of `windows` (default: all)."""
        return sorted(
            1000 * lat
            for t, status, lat in self.samples
            if status is not None and (windows is None or any(a <= t <= b for a, b in windows))
        )


def percentile(values: list[float], q: float) -> float:
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


def describe(ms: list[float]) -> str:
    return (
        f"n={len(ms)} p50={percentile(ms, 0.5):.1f} ms p99={percentile(ms, 0.99):.1f} ms "
        f"max={max(ms, default=float('nan')):.1f} ms"
    )


class Stream(threading.Thread):
    """One streamed completion; keeps every `data:` payload."""

    def __init__(self, url: str, body: dict) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.body = body
        self.events: list[str] = []
        self.started = threading.Event()
        self.error: str | None = None

    def run(self) -> None:
        try:
            with httpx.stream(
                "POST", self.url + "/v1/completions", json={**self.body, "stream": True}, timeout=600
            ) as response:
                for line in response.iter_lines():
                    if line.startswith("data: "):
                        self.events.append(line[6:])
                        self.started.set()
        except httpx.HTTPError as e:
            self.error = f"{type(e).__name__}: {e}"
        finally:
            self.started.set()

    @property
    def finish_reason(self) -> str | None:
        for event in reversed(self.events):
            if event != "[DONE]":
                payload = json.loads(event)
                return payload["choices"][0]["finish_reason"] if payload.get("choices") else "error"
        return None


def probe_big_body(url: str, body_mb: float, repeat: int) -> None:
    probe = HealthProbe(url)
    probe.start()
    time.sleep(2.0)
    prompt = "word " * int(body_mb * 2**20 / 5)
    content = json.dumps({"prompt": prompt, "max_tokens": 1}).encode()
    windows, outcomes = [], []
    for _ in range(repeat):
        started = time.monotonic()
        response = httpx.post(
            url + "/v1/completions", content=content, headers={"Content-Type": "application/json"}, timeout=600
        )
        windows.append((started, time.monotonic()))
        outcomes.append(f"{response.status_code} {response.json().get('error', {}).get('code')}")
    time.sleep(2.0)
    probe.stop.set()
    probe.join()
    took = sorted(1000 * (b - a) for a, b in windows)
    print(
        f"big-body: {repeat} x {len(content) / 2**20:.2f} MiB body -> {sorted(set(outcomes))}, answered in "
        f"p50 {percentile(took, 0.5):.0f} ms / max {took[-1]:.0f} ms; /health while they were sent: "
        f"{describe(probe.latencies_ms(windows))}; whole run: {describe(probe.latencies_ms())}"
    )


def probe_streams(url: str, streams: int, max_tokens: int) -> None:
    body = {
        "prompt": "Write a long story about a lighthouse keeper.",
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "temperature": 0,
    }
    running = [Stream(url, body) for _ in range(streams)]
    probe = HealthProbe(url)
    probe.start()
    started = time.monotonic()
    for stream in running:
        stream.start()
    for stream in running:
        stream.join()
    ended = time.monotonic()
    probe.stop.set()
    probe.join()
    done = sum(s.events[-1:] == ["[DONE]"] for s in running)
    print(
        f"streams: {streams} streams of {max_tokens} tokens in {ended - started:.1f} s, {done} ended with "
        f"[DONE]; /health while they ran: {describe(probe.latencies_ms([(started, ended)]))}"
    )


def probe_drain(url: str, proc: subprocess.Popen, streams: int, max_tokens: int) -> None:
    body = {
        "prompt": "Write a long story about a lighthouse keeper.",
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "temperature": 0,
    }
    running = [Stream(url, body) for _ in range(streams)]
    for stream in running:
        stream.start()
    for stream in running:
        stream.started.wait(600)
    probe = HealthProbe(url)
    probe.start()
    time.sleep(0.5)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    status = proc.wait(timeout=600)
    exited = time.monotonic()
    probe.stop.set()
    probe.join()
    for stream in running:
        stream.join(timeout=30)
    during = [s for t, s, _ in probe.samples if sent <= t < exited]
    answered = [s for s in during if s is not None]
    refused_before_last = sum(1 for s in during[: len(answered)] if s is None)
    reasons = [s.finish_reason for s in running]
    ended = sum(s.events[-1:] == ["[DONE]"] and s.error is None for s in running)
    print(
        f"drain: SIGTERM -> exit status {status} after {exited - sent:.1f} s; streams: {ended}/{streams} ended "
        f"with [DONE], finish_reason {reasons}, errors {[s.error for s in running if s.error]}; /health during "
        f"the drain: {len(answered)} answers, statuses {sorted(set(answered))}, first answer "
        f"{answered[0] if answered else None}, {refused_before_last} refused before the last answer"
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    serve_args: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, serve_args = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(prog="reliability", description=__doc__.split("\n\n")[0])
    parser.add_argument("probe", choices=["big-body", "streams", "drain"])
    parser.add_argument("--body-mb", type=float, default=5.0)
    parser.add_argument("--repeat", type=int, default=20, help="big-body: how many times the body is sent")
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--drain-timeout", type=float, default=5.0)
    args = parser.parse_args(argv)
    if args.probe == "drain":
        serve_args = ["--drain-timeout", str(args.drain_timeout), *serve_args]
    proc, url = start_server(serve_args)
    try:
        if args.probe == "big-body":
            probe_big_body(url, args.body_mb, args.repeat)
        elif args.probe == "streams":
            probe_streams(url, args.streams, args.max_tokens)
        else:
            probe_drain(url, proc, args.streams, args.max_tokens)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
    return 0


if __name__ == "__main__":
    sys.exit(main())
