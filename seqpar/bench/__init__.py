"""Benchmarks behind ``seqpar bench``: each runs real multi-process jobs and prints
measured numbers next to what theory says they should be (never a number it did not
measure)."""
