"""Checks an installed samba-hf (a wheel in a fresh environment), run from outside the repository:
the packages import from site-packages, the command runs, and a model round-trips through a
Hub-ready folder (whose card template ships in the wheel) with the same logits."""

import contextlib
import io
import sys
import tempfile
from importlib.metadata import entry_points, version
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

import samba_conversion
import samba_hf
import samba_kernels
from samba_hf import SambaConfig, SambaForCausalLM
from samba_hf.hub import save_hub_folder

for module in (samba_hf, samba_kernels, samba_conversion):
    assert "site-packages" in module.__file__, f"{module.__name__} imported from {module.__file__}, not the install"
assert samba_hf.__version__ == version("samba-hf")
# The console script is installed and its entry point runs (in this process: a second one would import torch again).
assert (Path(sys.executable).parent / "samba-hf").is_file()
main = entry_points(group="console_scripts")["samba-hf"].load()
printed = io.StringIO()
with contextlib.redirect_stdout(printed), contextlib.suppress(SystemExit):
    main(["--version"])
assert printed.getvalue().strip() == f"samba-hf {samba_hf.__version__}", printed.getvalue()

torch.manual_seed(0)
model = SambaForCausalLM(SambaConfig.from_preset("tiny")).eval()
ids = torch.randint(0, 1024, (1, 40))
with tempfile.TemporaryDirectory() as folder:
    saved = save_hub_folder(model, Path(folder) / "tiny")
    assert "## Architecture" in (saved / "README.md").read_text()
    reloaded = AutoModelForCausalLM.from_pretrained(saved).eval()
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, model(ids).logits)
print(f"samba-hf {samba_hf.__version__} installed in {sys.prefix}: imports, command and save/load round trip work")
