"""The networks: the layout grammar, the series' Model_N classes and the registry, the per-layer summary, and a user's
models file or notebook read for its definitions only (a stranger's in a sandbox)."""
