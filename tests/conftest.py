import os

# Triton reads TRITON_INTERPRET when it is imported: decide before anything imports it.
# Without a GPU the Triton kernels run on the CPU through the interpreter.
if "TRITON_INTERPRET" not in os.environ:
    try:
        import torch

        if not torch.cuda.is_available():
            os.environ["TRITON_INTERPRET"] = "1"
    except ImportError:
        pass

