"""Measurement: one fused pass over the gradients (and, at log steps, the weights), reduced across ranks."""
