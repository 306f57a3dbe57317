"""Models: loading (local folders and built-ins), fingerprints, vocabulary utilities and the tree walker."""
