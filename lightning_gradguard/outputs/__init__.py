"""Outputs: everything GradGuard writes (scalars, histograms, heatmaps, events, the report); nothing here decides."""
