import os

# Benchmarks time the real paths: on the CPU that is the PyTorch reference, never Triton's interpreter.
os.environ.pop("TRITON_INTERPRET", None)
