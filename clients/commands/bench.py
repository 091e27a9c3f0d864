"""`headwise bench {latency,offline,serve,capacity,kernels}`: each benchmark lives in its own module."""

from __future__ import annotations

import importlib

_BENCHES = [
    "headwise.clients.bench.latency",
    "headwise.clients.bench.offline",
    "headwise.clients.bench.serve",
    "headwise.clients.bench.capacity",
    "headwise.kernels.bench",
]


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser("bench", help="benchmarks (batch latency, offline throughput, serving, kernels)")
    sub = parser.add_subparsers(dest="bench", required=True)
    for name in _BENCHES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:
                continue
            raise
        module.add_parser(sub)
