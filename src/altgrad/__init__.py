"""altgrad: a test bench for simulated low-precision (8-bit float) training."""

__version__ = "0.1.0"
