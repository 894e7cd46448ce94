"""Decisions: the clip policies, the LR guard, the per-layer diagnostics and the per-optimizer engine."""
