"""Our Triton kernels compile for the H200 (sm_90) with the 8B shape's constants, here, without a GPU.

The interpreter (tests/test_*_kernel.py) checks what the kernels compute but not that Triton's compiler takes
them: a loop-carried type that changes or a construct the compiler lacks fails only at compile time. Triton
compiles ahead of time for a named target down to a cubin (its wheel brings ptxas), so CI checks that too. It
runs in a child process: this one's kernels were built for the interpreter (tests/conftest.py).
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

from server.engine import lora_kernel, qkv_kernel, sampling_kernel  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
LORA = dict(shrunk="*bf16", shrunk_stride="i32", b="*bf16", b_stride="i32", out="*bf16", out_stride="i32")
LORA_8B = dict(SLOTS=8, RANK=16, RANK_PAD=16)
QKV = dict(
    qkv="*bf16", qkv_stride="i32", shrunk="*bf16", shrunk_stride="i32", b="*bf16", b_stride="i32", row_slots="*i64",
    cos="*bf16", sin="*bf16", positions="*i64", q_out="*bf16", k_cache="*bf16", v_cache="*bf16",
    cache_slot_stride="i32", cache_head_stride="i32", cache_pos_stride="i32", write_slots="*i64",
    write_positions="*i64",
)  # fmt: skip
SAMPLING = dict(
    logits="*fp32", stride="i32", temperature="*fp32", t_stride="i32", top_p="*fp32", p_stride="i32", top_k="*i64",
    k_stride="i32", keys="*i64", key_stride="i32", sample="*i1", out="*fp64", rows="i32",
)  # fmt: skip
KERNELS = {
    "sampling": (
        sampling_kernel._choose,
        SAMPLING,
        dict(
            vocab=128256,
            BLOCK=sampling_kernel.BLOCK,
            WAYS=sampling_kernel.WAYS,
            KEY_OF_MINUS_INF=sampling_kernel._KEY_OF_MINUS_INF,
        ),
    ),
    "lora expand": (
        lora_kernel._expand,
        dict(LORA, row_slots="*i64", width="i32", first_end="i32", second_end="i32"),
        dict(LORA_8B, BLOCK_N=lora_kernel.BLOCK_N),
    ),
    "lora gate/up": (
        lora_kernel._gated,
        dict(LORA, act="*bf16", row_slots="*i64", half="i32"),
        dict(LORA_8B, BLOCK_N=lora_kernel.BLOCK_N),
    ),
    "lora residual + norm": (
        lora_kernel._residual_norm,
        dict(LORA, x="*bf16", x_stride="i32", weight="*bf16", x_new="*bf16", h="*bf16", row_slots="*i64", eps="fp32"),
        dict(LORA_8B, width=4096, BLOCK_N=512),
    ),
    "q/k/v": (qkv_kernel._qkv, QKV, dict(LORA_8B, Q_HEADS=32, KV_HEADS=8, HALF=64, LORA=True)),
    "q/k/v, no adapter": (qkv_kernel._qkv, QKV, dict(LORA_8B, Q_HEADS=32, KV_HEADS=8, HALF=64, LORA=False)),
}


def compile_all() -> dict[str, str]:
    """name → "ok" or the compiler's error, each kernel compiled for sm_90 (in a process without the interpreter)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    results = {}
    for name, (kernel, types, constants) in KERNELS.items():
        names = list(inspect.signature(kernel.fn).parameters)
        if set(names) != set(types) | set(constants):
            results[name] = f"the kernel's arguments changed ({names}): update this table"
            continue
        signature = {n: "constexpr" if n in constants else types[n] for n in names}
        source = ASTSource(kernel, signature, constexprs={(names.index(n),): v for n, v in constants.items()})
        try:
            compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32))
            results[name] = "ok" if compiled.asm.get("cubin") else "no cubin"
        except Exception as exc:  # the compiler's message is the test's answer
            results[name] = f"{type(exc).__name__}: {exc}"[:2000]
    return results


@pytest.fixture(scope="module")
def compiled() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run(
        [sys.executable, "-m", "tests.test_kernels_compile"], cwd=REPO_ROOT, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.parametrize("name", list(KERNELS))
def test_the_kernel_compiles_to_a_hopper_cubin(compiled, name):
    assert compiled[name] == "ok"


if __name__ == "__main__":
    print(json.dumps(compile_all()))
