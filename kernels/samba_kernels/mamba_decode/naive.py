"""PyTorch reference of the Mamba mixer's decode step: the mixer's own modules, one after the other."""

import torch
import torch.nn.functional as F

from ..causal_conv1d.naive import causal_conv1d_update_ref
from ..selective_scan.naive import selective_state_update_ref


def mamba_decode_step_ref(
    x, z, conv_state, ssm_state, conv_weight, conv_bias, x_proj_weight, dt_proj_weight, dt_proj_bias, A_log, D
):
    rank, d_state = dt_proj_weight.shape[1], A_log.shape[1]
    xc = causal_conv1d_update_ref(x, conv_state, conv_weight, conv_bias, "silu")
    dt_low, B, C = F.linear(xc, x_proj_weight).split([rank, d_state, d_state], dim=-1)
    dt = F.linear(dt_low, dt_proj_weight, dt_proj_bias)
    return selective_state_update_ref(
        ssm_state, xc, dt, -torch.exp(A_log.float()), B, C, D.float(), z, dt_softplus=True
    )
