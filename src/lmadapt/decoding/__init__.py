"""Decoding: generation, continuation scoring, decoding-time steering and value models."""
