"""samba-hf: Samba (Mamba + sliding-window attention) for Hugging Face transformers.

Importing the package registers the model with transformers' Auto classes (and PEFT's default
LoRA targets, when PEFT is installed).
"""

__version__ = "0.1.0"  # the one place the version is written: pyproject.toml reads it from here

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

from .cache_samba import SambaStaticCache
from .configuration_samba import PRESETS, SambaConfig
from .hub import push_to_hub
from .modeling_samba import SambaForCausalLM, SambaForSequenceClassification, SambaModel, SambaPreTrainedModel
from .peft_integration import register_peft_defaults

AutoConfig.register("samba", SambaConfig, exist_ok=True)
AutoModel.register(SambaConfig, SambaModel, exist_ok=True)
AutoModelForCausalLM.register(SambaConfig, SambaForCausalLM, exist_ok=True)
AutoModelForSequenceClassification.register(SambaConfig, SambaForSequenceClassification, exist_ok=True)

# Saved folders carry the modeling code and an `auto_map`, so they load with trust_remote_code=True
# where samba-hf is not installed.
SambaConfig.register_for_auto_class()
SambaModel.register_for_auto_class("AutoModel")
SambaForCausalLM.register_for_auto_class("AutoModelForCausalLM")
SambaForSequenceClassification.register_for_auto_class("AutoModelForSequenceClassification")

register_peft_defaults()

# model.push_to_hub(...) uploads the card `samba-hf push` renders, not transformers' generic one.
SambaPreTrainedModel.push_to_hub = push_to_hub

__all__ = [
    "PRESETS",
    "SambaConfig",
    "SambaForCausalLM",
    "SambaForSequenceClassification",
    "SambaModel",
    "SambaPreTrainedModel",
    "SambaStaticCache",
]
