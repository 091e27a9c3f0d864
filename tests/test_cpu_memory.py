"""engine/cpu_memory.py: glibc keeps freed tensor memory for a CPU engine."""

from __future__ import annotations

import platform

import pytest

from headwise.engine import cpu_memory


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_glibc_accepts_the_settings_once_per_process(monkeypatch):
    assert cpu_memory.keep_freed_memory() is True
    # cached: a second engine does not call into libc again
    monkeypatch.setattr(cpu_memory.ctypes, "CDLL", lambda name: pytest.fail("called libc twice"))
    assert cpu_memory.keep_freed_memory() is True


def test_a_libc_without_mallopt_is_left_alone(monkeypatch):
    cpu_memory.keep_freed_memory.cache_clear()
    monkeypatch.setattr(cpu_memory.ctypes, "CDLL", lambda name: object())
    try:
        assert cpu_memory.keep_freed_memory() is False
    finally:
        cpu_memory.keep_freed_memory.cache_clear()
