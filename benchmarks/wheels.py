"""The wheels a GPU session installs offline, and the checks that they fit the GPU machine's image.

    python -m benchmarks.wheels prepare            # here, where PyPI is reachable: the wheels into .whl/
    python -m benchmarks.wheels verify /tmp/site   # on the GPU machine, after installing them into /tmp/site

The GPU image has torch, triton, transformers 5.17 and the libraries in IMAGE, and no network. The session
installs CARRIED (.whl/ is ignored by git and travels with the working tree, 64 MiB at most in all):
transformers 5.24.0, PEFT and bitsandbytes (LoRA, 4-bit and 8-bit loading), TRL and datasets for examples/lora.py
with the requirements the image lacks (dill, multiprocess; fsspec, as datasets takes none newer than 2026.9.0),
pytest with its requirements for tests/gpu, and ninja, which torch.utils.cpp_extension needs to build mamba-ssm's extension (its `ninja` command
lands in SITE/bin: put that on PATH). bitsandbytes ships a library per CUDA version; only those of the image's
CUDA 13 are kept (`slim_bitsandbytes`), as the others alone would fill the carry. `prepare` checks each wheel's
requirements against IMAGE and the other carried wheels, and fails naming any the image does not meet;
`verify` checks every requirement of what was installed against what the machine really has.
"""

import base64
import hashlib
import importlib.metadata
import re
import subprocess
import sys
import zipfile
from pathlib import Path

from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
WHEELS = ROOT / ".whl"
CARRIED = (
    "transformers==5.24.0",
    "peft==0.21.2",
    "bitsandbytes==0.50.2",
    "trl==1.16.0",
    "datasets==5.2.0",
    "dill==0.4.1",
    "multiprocess==0.70.19",
    "fsspec==2026.9.0",
    "pytest==9.2.0",
    "pluggy==1.7.0",
    "iniconfig==2.3.1",
    "pygments==2.21.0",
    "ninja==1.13.2",
)
IMAGE = {
    "python": "3.12.3",
    "torch": "2.11.0",
    "triton": "3.6.0",
    "transformers": "5.17.0",
    "huggingface-hub": "1.33.0",
    "tokenizers": "0.23.2",
    "safetensors": "0.8.0",
    "accelerate": "1.15.0",
}
LIMIT_BYTES = 48 * 2**20  # the carry holds 64 MiB; the rest is for .mamba_ssm_src and the tree itself


def normalized(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def wheel_requirements(wheel: Path) -> tuple[str, list[Requirement]]:
    """(project name, its requirements without extras) from a wheel's METADATA."""
    with zipfile.ZipFile(wheel) as archive:
        metadata = next(name for name in archive.namelist() if name.endswith(".dist-info/METADATA"))
        lines = archive.read(metadata).decode().splitlines()
    name = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("Name:"))
    requirements = [Requirement(line.split(":", 1)[1]) for line in lines if line.startswith("Requires-Dist:")]
    environment = {
        "python_version": ".".join(IMAGE["python"].split(".")[:2]),
        "python_full_version": IMAGE["python"],
        "sys_platform": "linux",
        "platform_system": "Linux",
        "extra": "",
    }
    return name, [r for r in requirements if r.marker is None or r.marker.evaluate(environment)]


def slim_bitsandbytes(wheel: Path, cuda_major: str = "13") -> None:
    """Rewrite bitsandbytes' wheel without its libraries for other CUDA versions than `cuda_major`, with a
    RECORD that lists what is left."""
    other_cuda = re.compile(rf"libbitsandbytes_cuda(?!{cuda_major})\d+\.so$")
    with zipfile.ZipFile(wheel) as archive:
        files = {name: archive.read(name) for name in archive.namelist() if not other_cuda.search(name)}
    record = next(name for name in files if name.endswith(".dist-info/RECORD"))
    lines = []
    for name, data in files.items():
        if name != record:
            digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
            lines.append(f"{name},sha256={digest},{len(data)}")
    files[record] = ("\n".join([*lines, f"{record},,"]) + "\n").encode()
    staging = wheel.with_suffix(".partial")
    with zipfile.ZipFile(staging, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    staging.replace(wheel)


def prepare() -> int:
    WHEELS.mkdir(exist_ok=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--only-binary",
            ":all:",
            "--python-version",
            IMAGE["python"],
            "-d",
            str(WHEELS),
            *CARRIED,
        ],
        check=True,
    )
    for wheel in WHEELS.glob("bitsandbytes-*.whl"):
        slim_bitsandbytes(wheel)
    wanted = {normalized(Requirement(spec).name): spec.split("==")[1] for spec in CARRIED}
    stale = [
        wheel
        for wheel in WHEELS.glob("*.whl")
        if normalized(wheel.name.split("-")[0]) not in wanted
        or wheel.name.split("-")[1] != wanted[normalized(wheel.name.split("-")[0])]
    ]
    if stale:
        print(f"not carried, remove them from {WHEELS}: {', '.join(wheel.name for wheel in stale)}")
        return 1
    available = {normalized(name): version for name, version in IMAGE.items()} | wanted
    unmet, unknown = [], set()
    for wheel in sorted(WHEELS.glob("*.whl")):
        name, requirements = wheel_requirements(wheel)
        for requirement in requirements:
            version = available.get(normalized(requirement.name))
            if version is None:
                unknown.add(requirement.name)
            elif not requirement.specifier.contains(version, prereleases=True):
                unmet.append(f"{name} needs {requirement}, the image has {version}")
    size = sum(wheel.stat().st_size for wheel in WHEELS.glob("*.whl"))
    print(f"{WHEELS}: {len(list(WHEELS.glob('*.whl')))} wheels, {size / 2**20:.1f} MiB")
    if unknown:
        print(f"not known for the image (checked on the GPU machine by `verify`): {', '.join(sorted(unknown))}")
    if unmet:
        print("add wheels to CARRIED for: " + "; ".join(unmet))
    if size > LIMIT_BYTES:
        print(f"the wheels take more than {LIMIT_BYTES / 2**20:.0f} MiB of the 64 MiB carry")
    return 1 if unmet or size > LIMIT_BYTES else 0


def verify(site: Path) -> int:
    """Every requirement of the distributions installed in `site` is met by what this Python imports."""
    unmet = []
    for distribution in importlib.metadata.distributions(path=[str(site)]):
        for text in distribution.requires or []:
            requirement = Requirement(text)
            if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
                continue
            try:
                version = importlib.metadata.version(requirement.name)
            except importlib.metadata.PackageNotFoundError:
                unmet.append(f"{distribution.metadata['Name']} needs {requirement}: not installed")
                continue
            if not requirement.specifier.contains(version, prereleases=True):
                unmet.append(f"{distribution.metadata['Name']} needs {requirement}: found {version}")
    if unmet:
        print("unmet requirements of the carried wheels (add wheels to benchmarks/wheels.py's CARRIED):")
        print("\n".join(f"  {line}" for line in unmet))
        return 1
    print(f"carried wheels in {site}: every requirement met")
    return 0


def main(argv: list[str]) -> int:
    if argv[:1] == ["prepare"]:
        return prepare()
    if argv[:1] == ["verify"] and len(argv) == 2:
        return verify(Path(argv[1]))
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
