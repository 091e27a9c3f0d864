"""Profilers that score every KV head of a model on offline data and write plans (DESIGN.md s.5)."""
