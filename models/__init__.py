"""Model zoo for examples, tests and benchmarks: pure-JAX models with optax training steps.

Data is generated in code (no downloads): see `synthetic_batch` in each module.
"""
