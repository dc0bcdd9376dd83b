"""Operators of the FLUX.1 Kontext provider."""
