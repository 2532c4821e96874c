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
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

from server.engine import decode_attention, lora_kernel, qkv_kernel, sampling_kernel  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]
LORA = dict(shrunk="*bf16", shrunk_stride="i32", b="*bf16", b_stride="i32", out="*bf16", out_stride="i32")
LORA_8B = dict(SLOTS=8, RANK=16, RANK_PAD=16)
QKV = dict(
    qkv="*bf16", qkv_stride="i32", shrunk="*bf16", shrunk_stride="i32", b="*bf16", b_stride="i32", row_slots="*i64",
    cos="*bf16", sin="*bf16", positions="*i64", q_out="*bf16", k_cache="*bf16", v_cache="*bf16",
    cache_slot_stride="i32", cache_head_stride="i32", cache_pos_stride="i32", write_slots="*i64",
    write_positions="*i64",
)  # fmt: skip
DECODE = dict(
    q="*bf16", q_row_stride="i32", q_head_stride="i32", k="*bf16", v="*bf16", slot_stride="i32", head_stride="i32",
    pos_stride="i32", lengths="*i64", span="i32", split="i32", scale="fp32", out="*bf16", part_acc="*fp32",
    part_m="*fp32", part_l="*fp32",
)  # fmt: skip
DECODE_8B = dict(GROUP=4, GROUP_PAD=16, HEAD_DIM=128, DIM_PAD=128, PRECISION="tf32")
DECODE_FP32 = dict(DECODE, q="*fp32", k="*fp32", v="*fp32", out="*fp32")
COMBINE = dict(part_acc="*fp32", part_m="*fp32", part_l="*fp32", out="*bf16", splits="i32")
SAMPLING = dict(logits="*fp32", stride="i32", temperature="*fp32", t_stride="i32", stats="*fp32")
RUNTIME = dict(vocab="i32", span="i32", splits="i32")
SAMPLING_CONSTANTS = dict(
    WAYS=sampling_kernel.WAYS,
    MAX_SPLITS=sampling_kernel.MAX_SPLITS,
    KEY_OF_MINUS_INF=sampling_kernel._KEY_OF_MINUS_INF,
)
SEARCH = dict(
    **SAMPLING, **RUNTIME, state="*i64", part="*fp32", prior="*i64", prior_part="*fp32", l_stride="i32",
    prior_limit="*i64", pl_stride="i32", rows="i32", index="i32", by_mass="i32", has_prior="i32",
)  # fmt: skip
RACE = dict(
    **SAMPLING, **RUNTIME, keys="*i64", key_stride="i32", sample="*i1", limit="*fp32", l_stride="i32",
    cut_state="*i64", cut_part="*fp32", race="*fp32", has_cut="i32", by_mass="i32",
)  # fmt: skip
KERNELS = {
    "sampling: statistics": (sampling_kernel._stats, dict(SAMPLING, **RUNTIME), dict(BLOCK=sampling_kernel.BLOCK)),
    "sampling: top-k pass": (
        sampling_kernel._search_pass,
        dict(SEARCH, limit="*i64"),
        dict(SAMPLING_CONSTANTS, BLOCK=sampling_kernel.SEARCH_BLOCK),
    ),
    "sampling: top-p pass": (
        sampling_kernel._search_pass,
        dict(SEARCH, limit="*fp32"),
        dict(SAMPLING_CONSTANTS, BLOCK=sampling_kernel.SEARCH_BLOCK),
    ),
    "sampling: race": (sampling_kernel._race, RACE, dict(SAMPLING_CONSTANTS, BLOCK=sampling_kernel.BLOCK)),
    "sampling: finish": (
        sampling_kernel._finish,
        dict(stats="*fp32", sample="*i1", race="*fp32", out="*fp64", rows="i32", vocab="i32", splits="i32"),
        dict(MAX_SPLITS=sampling_kernel.MAX_SPLITS),
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
    "q/k/v": (qkv_kernel._qkv, QKV, dict(LORA_8B, Q_HEADS=32, KV_HEADS=8, HALF=64, LORA=True)),
    "q/k/v, no adapter": (qkv_kernel._qkv, QKV, dict(LORA_8B, Q_HEADS=32, KV_HEADS=8, HALF=64, LORA=False)),
    **{
        f"decode attention: blocks of {block}{', one split' if direct else ''}": (
            decode_attention._split,
            DECODE,
            dict(DECODE_8B, BLOCK=block, DIRECT=direct),
        )
        for block in (16, 32, 64)
        for direct in (False, True)
    },
    "decode attention: float32 cache": (
        decode_attention._split,
        DECODE_FP32,
        dict(DECODE_8B, BLOCK=64, DIRECT=False, PRECISION="ieee"),
    ),
    "decode attention: combine": (
        decode_attention._combine,
        COMBINE,
        dict(HEAD_DIM=128, DIM_PAD=128, MAX_SPLITS=decode_attention.MAX_SPLITS),
    ),
}


TYPES = {torch_dtype: name for torch_dtype, name in (("float32", "*fp32"), ("int64", "*i64"), ("bool", "*i1"),
                                                       ("float64", "*fp64"))}  # fmt: skip


class Recorder:
    """Stands in for a kernel: records each launch's argument types and constants instead of running."""

    def __init__(self, kernel, name: str, seen: dict) -> None:
        self.kernel, self.name, self.seen = kernel, name, seen

    def __getitem__(self, grid):
        def launch(*args, num_warps=4, **constants):
            names = list(inspect.signature(self.kernel.fn).parameters)
            types = {n: _type_of(a) for n, a in zip(names, args)}
            constants = {k: v for k, v in constants.items() if k in names}
            self.seen[(self.name, repr(sorted(types.items())), repr(sorted(constants.items())), num_warps)] = (
                self.kernel,
                types,
                constants,
                num_warps,
            )

        return launch


def _type_of(arg) -> str:
    if hasattr(arg, "dtype"):
        return TYPES[str(arg.dtype).removeprefix("torch.")]
    return "fp32" if isinstance(arg, float) else "i32"


def sampler_launches() -> dict[str, tuple]:
    """What sampling_kernel.choose really launches for each mix of rows (greedy only; sampled with no cut,
    top-p, top-k, both), with the argument types it really passes: a stand-in of the wrong type in a branch
    no row takes still has to compile."""
    import torch

    from server.engine.sampling import SamplingParams, row_params

    seen: dict = {}
    kernels = {name: getattr(sampling_kernel, name) for name in ("_stats", "_search_pass", "_race", "_finish")}
    for name, kernel in kernels.items():
        setattr(sampling_kernel, name, Recorder(kernel, name, seen))
    try:
        for cuts in (None, {}, {"top_p": 0.9}, {"top_k": 5}, {"top_p": 0.9, "top_k": 5}):
            params = [SamplingParams(1)] + ([] if cuts is None else [SamplingParams(1, do_sample=True, **cuts)])
            rows = [type("Row", (), dict(params=p, seed=1, prompt_ids=(0,), generated=(), in_flight=0)) for p in params]
            sampling_kernel.choose(torch.zeros(len(rows), 4096), row_params(rows, torch.device("cpu")))
    finally:
        for name, kernel in kernels.items():
            setattr(sampling_kernel, name, kernel)
    return {f"launched {name} #{i}": value for i, ((name, *_), value) in enumerate(seen.items())}


def compile_all() -> dict[str, dict]:
    """name → {"status": "ok" or the compiler's error, "registers", "spills"}, each kernel compiled for sm_90 (in
    a process without the interpreter). `python -m tests.test_kernels_compile` prints it as JSON."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    results = {}
    for name, (kernel, types, constants, *warps) in {**KERNELS, **sampler_launches()}.items():
        names = list(inspect.signature(kernel.fn).parameters)
        if set(names) != set(types) | set(constants):
            results[name] = {"status": f"the kernel's arguments changed ({names}): update this table"}
            continue
        signature = {n: "constexpr" if n in constants else types[n] for n in names}
        source = ASTSource(kernel, signature, constexprs={(names.index(n),): v for n, v in constants.items()})
        try:
            compiled = triton.compile(
                source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps[0] if warps else 4)
            )
            ok = bool(compiled.asm.get("cubin"))
            results[name] = {"status": "ok" if ok else "no cubin", **registers(compiled.asm["ptx"])}
        except Exception as exc:  # the compiler's message is the test's answer
            results[name] = {"status": f"{type(exc).__name__}: {exc}"[:2000]}
            continue
        try:  # apart: a disassembler that fails is this one test's failure, not every kernel's
            results[name]["loop"] = loop_facts(compiled.asm["cubin"]) if ok else None
        except (OSError, subprocess.SubprocessError) as exc:
            results[name]["loop"] = {"error": f"{type(exc).__name__}: {exc}"[:500]}
    return results


def registers(ptx: str) -> dict[str, int]:
    """What ptxas reports for this PTX on sm_90 (Triton's own ptxas, verbose): registers per thread and bytes
    of register spill stores."""
    from triton.backends.nvidia.compiler import get_ptxas

    with tempfile.NamedTemporaryFile("w", suffix=".ptx") as source:
        source.write(ptx)
        source.flush()
        report = subprocess.run(
            [get_ptxas(90).path, "-v", "--gpu-name", "sm_90a", source.name, "-o", os.devnull],
            capture_output=True,
            text=True,
            check=True,
        ).stderr
    used = re.findall(r"Used (\d+) registers", report)
    return {
        "registers": max(map(int, used)),
        "spills": sum(int(n) for n in re.findall(r"(\d+) bytes spill stores", report)),
    }


def loop_facts(cubin: bytes) -> dict[str, int] | None:
    """The machine code of the loop around the kernel's exp (the first backward branch whose body holds a
    MUFU.EX2), read with Triton's own nvdisasm: its instructions, and those that touch shared memory or wait at a
    barrier. None where no loop computes an exp."""
    from triton.backends.nvidia.compiler import get_ptxas

    nvdisasm = Path(get_ptxas(90).path).with_name("nvdisasm")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as binary:
        binary.write(cubin)
        binary.flush()
        sass = subprocess.run([nvdisasm, "-c", binary.name], capture_output=True, text=True, check=True).stdout
    lines, labels = sass.splitlines(), {}
    for index, line in enumerate(lines):
        if re.match(r"\s*\.L_x_\d+:", line):
            labels[line.strip().rstrip(":")] = index
        target = re.search(r"BRA `\((\.L_x_\d+)\)", line)
        if target and target.group(1) in labels:  # the label came first: a branch backwards closes a loop
            loop = lines[labels[target.group(1)] : index + 1]
            body = [text for text in loop if re.search(r"/\*[0-9a-f]{4}\*/", text)]  # instructions, not comments
            if any("MUFU.EX2" in text for text in body):
                shared = [text for text in body if re.search(r"\b(BAR|LDS|LDSM|STS|ATOMS|LDGSTS)\b", text)]
                return {"instructions": len(body), "shared_memory_or_barriers": len(shared)}
    return None


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
    assert compiled[name]["status"] == "ok"


def test_every_launch_of_the_sampler_compiles_with_the_types_it_is_given(compiled):
    launched = {name: result for name, result in compiled.items() if name.startswith("launched ")}
    assert {name.split(" ")[1] for name in launched} == {"_stats", "_search_pass", "_race", "_finish"}
    assert all(result["status"] == "ok" for result in launched.values()), launched


def test_no_launch_of_the_sampler_spills_registers(compiled):
    """The sampler runs every step of every sampled batch: a spilling launch shape holds few programs per SM and
    waits on local memory (the search pass at 1024 × 16 sums over 4 warps spilled 432 bytes, 2026-12-07)."""
    launched = {name: result["spills"] for name, result in compiled.items() if name.startswith("launched ")}
    assert launched and not any(launched.values()), launched


def test_the_search_passes_loop_keeps_to_registers(compiled):
    """The threshold search's loop runs eight times per sampled step over every logit. With its per-logit values
    as vectors, each iteration converted them to the [SEARCH_BLOCK, WAYS] tile's layout through shared memory:
    131-132 instructions per iteration, 22 of them shared-memory loads and stores or barriers, against 73 and none
    as columns of the tile (sm_90, 2026-12-08)."""
    loops = {name: r["loop"] for name, r in compiled.items() if name.startswith("launched _search_pass")}
    assert loops and all(loop is not None and "error" not in loop for loop in loops.values()), loops
    assert not any(loop["shared_memory_or_barriers"] for loop in loops.values()), loops


if __name__ == "__main__":
    print(json.dumps(compile_all()))
