"""A first generate() in a new process, with Triton's disk cache empty, compiles every kernel it launches ahead, in
forked children whose results the compile-ahead threads load from Triton's disk cache, and none at its launch; its
tokens are the eager loop's."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

FIRST_CALLS = textwrap.dedent(
    """
    import json, threading, torch
    from triton import knobs
    from tests.gpu.helpers import random_model

    compiled, cache_hits = [], []
    knobs.runtime.jit_post_compile_hook = lambda **kw: compiled.append((kw["fn"].name, threading.current_thread().name))
    knobs.compilation.listener = lambda **kw: cache_hits.append(kw["cache_hit"])
    model = random_model()
    report = {}
    with torch.no_grad():
        for batch in (1, 3):
            prompt = torch.randint(1, 1024, (batch, 500), device="cuda")
            options = dict(attention_mask=torch.ones_like(prompt), max_new_tokens=32, min_new_tokens=32,
                           do_sample=False, pad_token_id=0, prefill_chunk_size=128)
            del compiled[:], cache_hits[:]
            engine = model.generate(prompt, **options)
            report[batch] = {"compiled": list(compiled), "compile_s": model._decode_engine.stats.compile_s,
                             "cache_hits": list(cache_hits),
                             "equal": bool(torch.equal(engine, model.generate(prompt, decode_engine=False, **options)))}
    print(json.dumps(report))
    """
)


def test_a_first_generate_compiles_its_kernels_ahead(tmp_path):
    environment = dict(os.environ, TRITON_CACHE_DIR=str(tmp_path / "triton"), TRITON_INTERPRET="0")
    result = subprocess.run(
        [sys.executable, "-c", FIRST_CALLS], env=environment, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    for batch, call in report.items():
        at_launch = [name for name, thread in call["compiled"] if not thread.startswith("samba-compile")]
        assert call["equal"], f"batch {batch}: the engine's tokens differ from the eager loop's"
        assert not at_launch, f"batch {batch}: compiled at their launch: {at_launch}"
    assert len(report["1"]["compiled"]) >= 8  # the prompt's kernels and the fused step's, all new
    hits = report["1"]["cache_hits"]
    assert hits and all(hits), "the process compiled a kernel itself: its child did not"
