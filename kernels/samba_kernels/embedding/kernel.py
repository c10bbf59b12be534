"""A decode step's embedding lookup in one launch:

    embedding_rows_(weight, tokens, out) -> None

weight (vocab, hidden), tokens (batch, 1) or (batch,) int64, out (batch, hidden) of any float dtype: out[i] =
weight[tokens[i]], cast to out's dtype, in place. Token ids must lie in [0, vocab): the kernel does not check them,
since reading them on the host would wait for the device (the decode engine's come from its argmax).

PyTorch's `index_select` and the cast into the float32 residual are two ordinary launches at the start of a decode
step, and the step's first product cannot start before they end. Launched as a programmatic dependent, this kernel
lets the next kernel start at once (`gdc_launch_dependents` first thing): the product loads its first weights while
the row is copied, and waits for it before it reads the row.
"""

import triton
import triton.language as tl

from .._common import block_size, cdiv, dependent_launch, gdc_launch_dependents, gdc_wait, use_triton
from .naive import embedding_rows_ref

BLOCK = 1024  # columns per program


# The decode engine reads each step's tokens from the next column of one buffer: 8-byte steps, which would compile a
# kernel for each 16-byte alignment.
@triton.jit(do_not_specialize_on_alignment=["tokens_ptr"])
def _embedding_rows_kernel(
    weight_ptr, tokens_ptr, out_ptr, hidden, stride_weight, stride_tokens, stride_out, BLOCK: tl.constexpr,
    PDL: tl.constexpr,
):  # fmt: skip
    row, block = tl.program_id(0), tl.program_id(1)
    if PDL:
        gdc_launch_dependents()
        gdc_wait()  # the token was written by the kernels before
    token = tl.load(tokens_ptr + row * stride_tokens)
    columns = block * BLOCK + tl.arange(0, BLOCK)
    column_mask = columns < hidden
    values = tl.load(weight_ptr + token * stride_weight + columns, mask=column_mask)
    tl.store(out_ptr + row * stride_out + columns, values.to(out_ptr.dtype.element_ty), mask=column_mask)


def embedding_rows_(weight, tokens, out) -> None:
    """Each row's embedding, in place (semantics: `embedding_rows_ref`; see the module docstring): the Triton kernel
    where `use_triton(weight)`, the reference elsewhere.

    Args:
        weight (torch.Tensor): `[vocab, hidden]`, contiguous along hidden.
        tokens (torch.Tensor): `[batch, 1]` or `[batch]` int64 token ids.
        out (torch.Tensor): `[batch, hidden]`, contiguous along hidden, written.
    """
    batch, hidden = out.shape
    if weight.dim() != 2 or weight.shape[1] != hidden or tokens.shape[0] != batch or tokens[0].numel() != 1:
        raise ValueError(
            f"embedding_rows_: out {tuple(out.shape)} takes a [vocab, {hidden}] weight (got {tuple(weight.shape)}) "
            f"and [{batch}] or [{batch}, 1] tokens (got {tuple(tokens.shape)})"
        )
    if not use_triton(weight):
        embedding_rows_ref(weight, tokens, out)
        return
    if weight.stride(1) != 1 or out.stride(1) != 1:
        raise ValueError("embedding_rows_: the kernel takes weight and out contiguous along hidden")
    block = block_size(hidden, BLOCK)
    _embedding_rows_kernel[(batch, cdiv(hidden, block))](
        weight,
        tokens,
        out,
        hidden,
        weight.stride(0),
        tokens.stride(0),
        out.stride(0),
        BLOCK=block,
        **dependent_launch(weight),
    )
