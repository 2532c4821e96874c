"""The register grids of ptxas_registers.txt (run from the repo root with the venv: python3 THIS). Ad hoc, kept as run."""
import inspect, subprocess, sys, tempfile, os
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from tests import test_kernels_compile as t
from server.engine import decode_attention
ptxas = os.path.join(os.path.dirname(triton.__file__), 'backends/nvidia/bin/ptxas')
def regs(kernel, types, consts, warps):
    names = list(inspect.signature(kernel.fn).parameters)
    signature = {n: "constexpr" if n in consts else types[n] for n in names}
    source = ASTSource(kernel, signature, constexprs={(names.index(n),): v for n, v in consts.items()})
    c = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps))
    with tempfile.NamedTemporaryFile('w', suffix='.ptx', delete=False) as f:
        f.write(c.asm['ptx'])
    out = subprocess.run([ptxas, '-v', '--gpu-name', 'sm_90a', f.name, '-o', '/dev/null'], capture_output=True, text=True)
    lines = [l for l in out.stderr.splitlines() if 'registers' in l or 'spill' in l]
    return ' | '.join(l.split('info    : ')[-1].strip() for l in lines)
kernel, types, constants = t.KERNELS["sampling: top-p pass"]
for block in (128, 256, 512, 1024):
    for warps in (4, 8):
        print("search pass", block, warps, regs(kernel, types, dict(constants, BLOCK=block), warps))
for dtype, types, prec in (("bf16", t.DECODE, "tf32"), ("fp32", t.DECODE_FP32, "ieee")):
    for block in (16, 32, 64):
        for warps in (4, 8):
            consts = dict(t.DECODE_8B, BLOCK=block, DIRECT=False, PRECISION=prec)
            print("decode", dtype, block, warps, regs(decode_attention._split, types, consts, warps))
