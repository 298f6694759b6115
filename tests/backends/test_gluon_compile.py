"""The Gluon kernel compiled for sm_90a without a GPU: no register spills, no serialized wgmmas, and the scale
arithmetic of its promotion step.

ptxas reports (warning C7514) when it has to serialize every wgmma, which happens silently whenever the
compiler copies the registers of an in-flight wgmma (docs/performance.md); the kernel would stay correct but
lose its overlap. Compiling needs Triton's internal compile entry points, which move between releases, so the
tests skip, saying why, when they are not there.

What a CPU can check of the kernel's numbers: Gluon has no CPU interpreter and the kernel is built from TMA
loads, mbarriers and wgmma, which only a Hopper GPU executes, so its output is tested on the GPU alone
(tests/backends/test_gluon.py). Its scale arithmetic lives in one helper, ``_promote`` (acc += tile *
a_scale[row] * w_scale), and that part can run here: a small kernel that loads the four operands, calls
``_promote`` and stores the result is compiled for sm_90a, and its TTGIR (the code after Triton's optimization
passes, before lowering to PTX) is evaluated with numpy against the reference formula. That catches a wrong
operator or operand in ``_promote``; which K group's scales the GEMM kernel hands to ``_promote`` (its
two-deep scale pipeline) is still seen only by the GPU tests.

The compiles run in a child process without TRITON_INTERPRET: the Triton interpreter, which the rest of the
suite runs under, patches triton.language functions process-wide, and a real compile in the same process then
fails depending on which tests ran before it.
"""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

SKIP_EXIT = 3  # the child's exit status when this triton cannot do the compile
PROMOTE_ROWS, PROMOTE_COLS = 16, 32  # the tile of the promote kernel below

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl

    from blockfp8.backends.gluon import _promote
except ImportError:  # no Gluon in this triton: the tests skip in the child process
    gluon = None

if gluon is not None:

    @gluon.jit
    def _promote_kernel(acc_ptr, part_ptr, sa_ptr, sw_ptr, out_ptr, SCALAR_WS: gl.constexpr):
        """out = _promote(acc, part, sa, sw) on one 16 x 32 tile (sw: one scalar, or one value per column)."""
        layout: gl.constexpr = gl.BlockedLayout([1, 1], [4, 8], [4, 1], [1, 0])
        rows = gl.arange(0, 16, layout=gl.SliceLayout(1, layout))
        cols = gl.arange(0, 32, layout=gl.SliceLayout(0, layout))
        offs = gl.expand_dims(rows, 1) * 32 + gl.expand_dims(cols, 0)
        sa = gl.load(sa_ptr + rows)
        if SCALAR_WS:
            sw = gl.load(sw_ptr)
        else:
            sw = gl.load(sw_ptr + cols)
        gl.store(out_ptr + offs, _promote(gl.load(acc_ptr + offs), gl.load(part_ptr + offs), sa, sw, SCALAR_WS))


def _run_child(*args: str) -> str:
    """Run this file as a script without TRITON_INTERPRET; its stdout (skips the test when it cannot compile)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env)
    if done.returncode == SKIP_EXIT:
        pytest.skip(done.stdout.strip())
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def _compile_internals():
    """Triton's compile entry points (internal, they move between releases); exits SKIP_EXIT without them."""
    from blockfp8.backends import gluon as g

    if g._IMPORT_ERROR:
        print(g._IMPORT_ERROR)
        sys.exit(SKIP_EXIT)
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.experimental.gluon._runtime import GluonASTSource
    except ImportError as e:
        print(f"triton's compile internals moved: {e}")
        sys.exit(SKIP_EXIT)
    return triton.compile, GPUTarget("cuda", 90, 32), GluonASTSource


def _ptxas_report(block_m: int, num_warps: int, persistent: bool, tmp_dir: str, block_n: int = 128, stages: int = 4,
                 m: int = 4096, n: int = 7168, k: int = 7168) -> str:
    """Compile a kernel (the one-tile one, or the persistent one) for sm_90a with the default config at this tile
    height (and ``block_n``, ``stages``), with the launch options ``gluon_gemm`` gives it; ptxas's -v report."""
    import torch

    from blockfp8.backends import gluon as g

    compile_, target, source = _compile_internals()
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        from triton.compiler import make_backend
        from triton.runtime.jit import create_function_from_signature
    except ImportError as e:
        print(f"triton's compile internals moved: {e}")
        sys.exit(SKIP_EXIT)

    cfg = g.GluonConfig(block_m=block_m, block_n=block_n, num_warps=num_warps, stages=stages, persistent=persistent)
    x = torch.empty(m, k, dtype=torch.float8_e4m3fn)
    w = torch.empty(n, k, dtype=torch.float8_e4m3fn)
    a_rows = 64 if persistent else cfg.block_m  # the persistent kernel loads 64 rows per math warp group
    a_desc = g.TensorDescriptor.from_tensor(x, [a_rows, 128], g._tile_layout(a_rows))
    w_desc = g.TensorDescriptor.from_tensor(w, [cfg.block_n, 128], g._tile_layout(cfg.block_n))
    out = torch.empty(m, n, dtype=torch.bfloat16)
    x_scale = torch.empty(k // 128, m).t()  # the column-major activation scales a model feeds it
    w_scale = torch.empty(n // 128, k // 128)
    args = dict(a_desc=a_desc, w_desc=w_desc, c_ptr=out, as_ptr=x_scale, ws_ptr=w_scale, bias_ptr=out, M=m, N=n,
                K=k, stride_asm=x_scale.stride(0), stride_ask=x_scale.stride(1), stride_wsn=w_scale.stride(0),
                stride_wsk=w_scale.stride(1), stride_cm=out.stride(0), HAS_BIAS=False, GROUP_M=cfg.group_m,
                STAGES=cfg.stages, UNROLL=cfg.unroll)
    options = {"num_warps": cfg.num_warps}
    fn = g._fp8_block_gemm_wgmma_kernel
    if persistent:
        fn = g._fp8_block_gemm_persistent_kernel
        args.update(MATH_WGS=block_m // 64)
        options = {"num_warps": 4, "maxnreg": g._PERSISTENT_MAXNREG[block_m // 64]}
    try:
        # As a launch compiles it: the JIT's specialization of the arguments (16-byte aligned pointers, integers
        # divisible by 16 or equal to 1) decides vector widths and constants, so the registers too.
        backend = make_backend(target)
        bound, specialization, parsed = create_function_from_signature(fn.signature, fn.params, backend)(**args,
                                                                                                         **options)
        parsed, signature, constexprs, attrs = fn._pack_args(backend, options, bound, specialization, parsed)
        compiled = compile_(source(fn, signature, constexprs, attrs), target=target, options=parsed.__dict__)
        ptxas = get_ptxas(90).path
    except (TypeError, AttributeError) as e:  # internal signatures differ in this triton
        print(f"triton's compile internals changed: {e}")
        sys.exit(SKIP_EXIT)
    ptx = os.path.join(tmp_dir, "kernel.ptx")
    with open(ptx, "w") as f:
        f.write(compiled.asm["ptx"])
    done = subprocess.run([ptxas, "-arch=sm_90a", "-v", ptx, "-o", os.path.join(tmp_dir, "kernel.cubin")],
                          capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"ptxas failed: {done.stderr}")
    return done.stderr


def _promote_ttgir() -> dict[str, str]:
    """TTGIR of the promote kernel compiled for sm_90a, with one scalar weight scale and with one per column."""
    compile_, target, source = _compile_internals()
    signature = {name: "*fp32" for name in ("acc_ptr", "part_ptr", "sa_ptr", "sw_ptr", "out_ptr")}
    signature["SCALAR_WS"] = "constexpr"
    out = {}
    for scalar in (True, False):
        try:
            compiled = compile_(source(_promote_kernel, signature, {(5,): scalar}), target=target,
                                options={"num_warps": 4})
        except (TypeError, AttributeError) as e:  # internal signatures differ in this triton
            print(f"triton's compile internals changed: {e}")
            sys.exit(SKIP_EXIT)
        out["scalar" if scalar else "columns"] = compiled.asm["ttgir"]
    return out


_OP = re.compile(r"^(?:(%[\w.]+) = )?([a-z_]+\.[a-z_]+)(.*)$")


def _shape(mlir_type: str) -> tuple[int, ...]:
    dims = re.match(r"\s*tensor<((?:\d+x)+)", mlir_type)
    return tuple(int(d) for d in dims.group(1).rstrip("x").split("x")) if dims else ()


def _evaluate_ttgir(ttgir: str, buffers: dict[str, np.ndarray]) -> None:
    """Run the public function of ``ttgir`` with numpy, fp32 arithmetic; ``buffers`` maps its pointer arguments'
    names to flat arrays, which its stores write. Knows the ops of a load-compute-store kernel and no others."""
    body = ttgir[ttgir.index("tt.func public"):]
    header, body = body.split("\n", 1)
    # A pointer is (argument name, element offsets); everything else a numpy value.
    values: dict[str, object] = {f"%{name}": (name, 0) for name in re.findall(r"%(\w+): !tt.ptr", header)}
    binary = {"addf": np.add, "subf": np.subtract, "mulf": np.multiply, "divf": np.divide,
              "addi": np.add, "subi": np.subtract, "muli": np.multiply}
    for line in body.splitlines():
        line = re.sub(r"\s+loc\(.*$", "", line.strip())
        match = _OP.match(line)
        if not match:
            continue
        result, op, rest = match.groups()
        kind = op.split(".")[1]
        result_type = rest.rsplit(" : ", 1)[-1].split("->")[-1]
        args = [values[a] for a in re.findall(r"%[\w.]+", rest.split(" : ")[0])]
        if op == "tt.return":
            return
        if op == "arith.constant":
            number = float(re.search(r"(?:dense<)?(-?[\d.e+-]+)", rest).group(1))
            value = np.full(_shape(result_type), number, np.float32 if "xf32" in result_type else np.int64)
        elif op == "tt.make_range":
            start, end = (int(re.search(rf"{k} = (\d+)", rest).group(1)) for k in ("start", "end"))
            value = np.arange(start, end)
        elif op == "tt.expand_dims":
            value = np.expand_dims(args[0], int(re.search(r"axis = (\d+)", rest).group(1)))
        elif op in ("tt.splat", "tt.broadcast"):
            shape = _shape(result_type)
            value = ((args[0][0], np.broadcast_to(args[0][1], shape)) if isinstance(args[0], tuple)
                     else np.broadcast_to(args[0], shape))
        elif op == "tt.addptr":
            value = (args[0][0], args[0][1] + args[1])
        elif op == "tt.load":
            value = buffers[args[0][0]][args[0][1]]
        elif op == "tt.store":
            buffers[args[0][0]][args[0][1]] = args[1]
            continue
        elif op == "ttg.convert_layout" or op.startswith("arith.ext"):
            value = args[0]
        elif op.startswith("arith.") and kind in binary:
            value = binary[kind](*args)
        else:
            raise AssertionError(f"an op the evaluator does not know in the compiled promote kernel: {line}")
        values[result] = value
    raise AssertionError("no tt.return in the compiled promote kernel")


@pytest.mark.parametrize("block_m,num_warps,persistent,block_n,stages",
                         [(128, 8, False, 128, 4), (64, 4, False, 128, 4), (128, 8, True, 128, 4),
                          (64, 4, True, 128, 4), (64, 4, True, 32, 8)],
                         ids=["128x128", "64x128", "persistent-128x128", "persistent-64x128", "persistent-64x32"])
def test_compiles_without_spills_or_serialized_wgmma(block_m, num_warps, persistent, block_n, stages, tmp_path):
    report = _run_child(json.dumps([block_m, num_warps, persistent, str(tmp_path), block_n, stages]))
    assert "C7514" not in report and "serialized" not in report, report
    assert "C7517" not in report, report  # a wait ptxas had to inject itself
    assert " 0 bytes spill stores" in report, report


def test_promotion_computes_the_reference_formula():
    """Each K group's fp32 tile enters the accumulator times a_scale[row] * w_scale, as in reference_gemm."""
    ttgir = json.loads(_run_child("promote"))
    rng = np.random.default_rng(0)
    shape = (PROMOTE_ROWS, PROMOTE_COLS)
    acc, part = rng.standard_normal(shape, np.float32), rng.standard_normal(shape, np.float32)
    sa = (10.0 ** rng.uniform(-3, 3, PROMOTE_ROWS)).astype(np.float32)
    for variant, sw in (("scalar", np.float32(0.37)), ("columns", (10.0 ** rng.uniform(-3, 3, PROMOTE_COLS)))):
        sw = np.asarray(sw, np.float32)
        buffers = {"acc_ptr": acc.ravel(), "part_ptr": part.ravel(), "sa_ptr": sa, "sw_ptr": sw.reshape(-1),
                   "out_ptr": np.full(acc.size, np.nan, np.float32)}
        _evaluate_ttgir(ttgir[variant], buffers)
        scaled = part * sa[:, None] * (sw if sw.ndim == 0 else sw[None, :])
        # fp32 products in another order: a few roundings of the terms' magnitude apart, never more.
        slack = 4 * np.finfo(np.float32).eps * (np.abs(acc) + np.abs(scaled))
        error = np.abs(buffers["out_ptr"].reshape(shape) - (acc + scaled))
        assert (error <= slack).all(), f"{variant}: promotion off by up to {(error / slack).max():.3g} x its slack"


if __name__ == "__main__":
    if sys.argv[1] == "promote":
        print(json.dumps(_promote_ttgir()))
    else:
        print(_ptxas_report(*json.loads(sys.argv[1])))
