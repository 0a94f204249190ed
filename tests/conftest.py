import os

# Triton's interpreter must be chosen before Triton is first imported: kernels decorated with @triton.jit
# then run on the CPU (through numpy), which is how the kernel tests exercise them without a GPU.
os.environ.setdefault("TRITON_INTERPRET", "1")
