"""The names of torch dtypes that samba-hf accepts, on the command line and in its Python functions."""

import torch

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}
DTYPE_NAMES = ("float32", "bfloat16", "float16")  # each with its short form fp32, bf16, fp16


def parse_dtype(dtype, allow_auto: bool = False):
    """The torch dtype a name stands for ("bfloat16" or "bf16", ...). A torch.dtype and None pass
    through; "auto" (let transformers pick the checkpoint's dtype) passes where `allow_auto`."""
    if dtype is None or isinstance(dtype, torch.dtype) or (allow_auto and dtype == "auto"):
        return dtype
    if dtype not in DTYPES:
        known = ", ".join((["auto"] if allow_auto else []) + list(DTYPES))
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {known}.")
    return DTYPES[dtype]


__all__ = ["DTYPES", "DTYPE_NAMES", "parse_dtype"]
