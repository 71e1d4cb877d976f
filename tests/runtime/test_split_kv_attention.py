"""Split-cache decode attention (runtime/engine/split_kv_attention.py): how the cache is cut, and the
kernel against torch's SDPA under Triton's CPU interpreter where Triton is installed (the same kernel
runs on the GPU in test_engine_gpu.py, in bf16 too: the interpreter's bf16 dot is not exact)."""
import math
import os
import subprocess
import sys
import textwrap

import pytest

from runtime.engine.split_kv_attention import BLOCK_N, plan_chunks

from tests.conftest import ROOT


@pytest.mark.parametrize("programs,length,sms", [(8, 576, 132), (8, 32768, 132), (256, 640, 132),
                                                 (1024, 8192, 132), (2, 10, 4), (8, 64, 132)])
def test_the_cache_is_cut_into_whole_blocks_to_keep_every_multiprocessor_busy(programs, length, sms):
    chunks, chunk = plan_chunks(programs, length, sms)
    blocks = math.ceil(length / BLOCK_N)
    assert chunk % BLOCK_N == 0 and chunks * chunk >= length > (chunks - 1) * chunk   # covered, no empty chunk
    assert 1 <= chunks <= blocks
    # About two programs per multiprocessor, unless the cache has fewer blocks than that asks for.
    assert programs * chunks >= min(2 * sms, programs * blocks)
    wanted = min(blocks, math.ceil(2 * sms / programs))
    assert chunks < 2 * wanted                                   # and not many more


def test_the_kernel_matches_sdpa_under_tritons_interpreter():
    pytest.importorskip("triton")
    script = textwrap.dedent("""
        import torch, torch.nn.functional as F
        from runtime.engine import split_kv_attention as s
        torch.manual_seed(0)
        for rows, heads, group, dim, length, dtype, tol in [(1, 2, 4, 16, 100, torch.float32, 1e-5),
                                                            (3, 2, 2, 64, 300, torch.float32, 1e-5),
                                                            (2, 8, 4, 128, 130, torch.float16, 2e-3)]:
            q = torch.randn(rows, heads, group, dim, dtype=dtype)
            k, v = (torch.randn(rows, heads, length, dim, dtype=dtype) for _ in range(2))
            mask = torch.zeros(rows, 1, 1, length + 7, dtype=torch.bool)   # left padding, unused tail
            for r in range(rows):
                mask[r, 0, 0, 5 * r:length - 70 * r] = True
            out = s.decode(q, k, v, mask, dim ** -0.5)
            ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask[..., :length])
            err = (out.float() - ref).abs().max().item()
            assert out.dtype == dtype and err < tol, (rows, dim, dtype, err)
        print("ok")
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])})
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]
