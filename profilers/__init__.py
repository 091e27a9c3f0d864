"""Profilers: score every KV head of a model on offline data and write plans (docs/design.md,
"Profilers")."""
