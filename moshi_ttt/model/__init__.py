"""Moshi integration: hybrid TTT layer, build, presets, chunked training forward, weights, state files, generation."""
