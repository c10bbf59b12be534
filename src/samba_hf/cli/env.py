"""`samba-hf env`: versions, and the implementation each Mamba op would use on this machine."""

import platform
from importlib.metadata import PackageNotFoundError, version

PACKAGES = (
    "samba-hf",
    "torch",
    "transformers",
    "triton",
    "accelerate",
    "safetensors",
    "tokenizers",
    "huggingface-hub",
    "peft",
    "datasets",
    "mamba-ssm",
    "causal-conv1d",
)


def add_parser(commands, formatter) -> None:
    parser = commands.add_parser(
        "env", help="versions, and the implementation each Mamba op would use here", formatter_class=formatter
    )
    parser.set_defaults(run=run)


def run(args) -> int:
    import torch

    from .. import kernel_dispatch

    print(f"python          {platform.python_version()} ({platform.platform()})")
    for package in PACKAGES:
        try:
            installed = version(package)
        except PackageNotFoundError:
            installed = "not installed"
        print(f"{package:<16}{installed}")
    print(f"cuda            {torch.cuda.get_device_name() if torch.cuda.is_available() else 'not available'}")
    choice = kernel_dispatch.requested_implementation()
    for op, devices in kernel_dispatch.describe().items():
        print(f"{op} (SAMBA_KERNELS={choice}):")
        for device, implementation in devices.items():
            print(f"  {device:<6} tensors -> {implementation}")
    return 0
