"""Compile Triton kernels for real GPUs (sm_80, sm_90) without one.

The CPU tests run kernels in Triton's interpreter, which accepts things the GPU compiler rejects (small dot shapes,
for one). ``compile_for_gpus`` sends kernels through Triton's NVIDIA backend (down to a cubin, with the bundled
ptxas) in a subprocess without TRITON_INTERPRET and returns the shared memory each one needs.
"""

import json
import os
import subprocess
import sys

PRELUDE = r'''
import json
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

def compile_kernel(fn, types, consts, arch):
    signature = {name: types.get(name, "constexpr") for name in fn.arg_names}
    return triton.compile(ASTSource(fn=fn, signature=signature, constexprs=consts), target=GPUTarget("cuda", arch, 32))

shared = {}
'''
SMALLEST_SHARED_MEMORY = 99 * 1024  # sm_86 / sm_89; sm_80 and sm_90 have more


def compile_for_gpus(body: str) -> dict[str, int]:
    """Run ``body`` (which fills ``shared[name] = compile_kernel(...).metadata.shared``) and return ``shared``."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = PRELUDE + body + "\nprint(json.dumps(shared))\n"
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
