"""Spectral analysis of captures: random-matrix numerics, channels, the report, its plots."""
