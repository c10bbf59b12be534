"""PEFT defaults for Samba: `LoraConfig(task_type="CAUSAL_LM")` without `target_modules` adapts
every linear projection of the model."""

import importlib.util

# Every nn.Linear inside the layers: attention (q/k/v/o_proj), SwiGLU (gate/up/down_proj) and Mamba
# (in/x/dt/out_proj). The Mamba mixer calls each one as a module, so an adapter on any of them takes
# effect. The LM head (tied to the embedding) and the depthwise conv1d are left out.
SAMBA_LORA_TARGET_MODULES = [
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "in_proj",
    "x_proj",
    "dt_proj",
    "out_proj",
]


def register_peft_defaults() -> None:
    """Make the projections above PEFT's default LoRA targets for model_type "samba"; a no-op
    without PEFT. PEFT looks the model type up in this dict when `target_modules` is None."""
    if importlib.util.find_spec("peft") is None:
        return
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.setdefault("samba", list(SAMBA_LORA_TARGET_MODULES))


__all__ = ["SAMBA_LORA_TARGET_MODULES", "register_peft_defaults"]
