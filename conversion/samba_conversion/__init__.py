"""Checkpoint conversion to and from samba-hf (the `samba_conversion` package; `samba-hf convert`
runs it on the command line).

- `convert_lit_gpt` / `convert_to_lit_gpt`: the Samba reference code (github.com/microsoft/Samba).
- `convert_fla`: flash-linear-attention's Samba.
- `convert_transformers` / `samba_from_transformers`: transformers' Mistral, Llama and Mamba.

Every converter infers the sizes from the tensor shapes, refuses missing, unexpected or misshapen
tensors before writing anything, streams the weights (about one copy in memory) and can verify the
converted model's logits against an independent forward of the source.
"""

from .core import ConversionError, CorruptCheckpointError, VerificationError
from .fla import convert_fla
from .from_transformers import convert_transformers, samba_from_transformers
from .lit_gpt import convert_lit_gpt, convert_to_lit_gpt

__all__ = [
    "ConversionError",
    "CorruptCheckpointError",
    "VerificationError",
    "convert_fla",
    "convert_lit_gpt",
    "convert_to_lit_gpt",
    "convert_transformers",
    "samba_from_transformers",
]
