"""Compile the fused EGNN kernels for a GPU without one: shared memory, registers and spills per tile choice.

    python -m trainer.kernel_check [--arch 90] [--hidden 256] [--dtype bf16|fp32] [--tiles 4,8,32,8 ...] [--json]

Triton compiles a kernel to a GPU binary on any machine (its wheel carries NVIDIA's `ptxas`); what the CPU
interpreter cannot show, this does: whether a tile choice fits the architecture's shared memory (a kernel over
the limit fails to launch) and how many registers it uses and spills (spills go to slow local memory). Speed
still needs a GPU (`make gpu-check`'s `tune`). Each of the four kernels (forward and backward, message and
coordinate MLP) is compiled for the given hidden size; the default tiles are model/fused_edges.py's (its
training tiles for all four, its forward-only tiles for the two forward kernels).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

# the most shared memory one program may use (bytes, opt-in maximum per block): CUDA's per-architecture limits
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}


def _signature(kernel, weight_dtype: str, constants: dict) -> dict:
    """Triton signature of a fused_edges kernel from its parameter names: W_2 and the buffers written in W_2's
    dtype take `weight_dtype`, other pointers float32, N and NBI int32, and the constexprs `constants`."""
    sig = {}
    for name in kernel.arg_names:
        if name in constants:
            sig[name] = "constexpr"
        elif name in ("N", "NBI", "B", "MOLECULES"):
            sig[name] = "i32"
        elif name in ("W2", "S_OUT", "DZ_OUT"):
            sig[name] = f"*{weight_dtype}"
        else:
            sig[name] = "*fp32"
    return sig


def _ptxas(arch: int) -> str:
    import triton
    try:
        from triton.backends.nvidia.compiler import get_ptxas
        return get_ptxas(arch).path
    except Exception:  # another triton layout: the binaries its wheel ships
        folder = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
        return next(os.path.join(folder, n) for n in ("ptxas-blackwell", "ptxas")
                    if os.path.exists(os.path.join(folder, n)))


def compile_kernel(kind: str, mode: int, tiles: tuple[int, int, int, int], hidden: int, weight_dtype: str,
                   arch: int, onchip: bool = False) -> dict:
    """{shared_bytes, registers, spill_bytes} of one kernel ('forward', 'backward' or 'weight-grad', the
    on-chip reduction of W_2's gradient) compiled for sm_<arch>."""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from molscale.trainer.model import fused_edges
    if fused_edges.INTERPRETED:
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter's kernels cannot be compiled for a GPU")
    kernel = {"forward": fused_edges._edge_mlp_forward, "backward": fused_edges._edge_mlp_backward,
              "weight-grad": fused_edges._edge_mlp_weight_grad}[kind]
    bi, bj, bk, warps = tiles
    hp = max(16, triton.next_power_of_2(hidden))
    constants = {"H": hidden, "HP": hp, "BI": bi, "BJ": bj, "MODE": mode, "ACC": tl.float32, "TF32": True,
                 **({"BN": min(bk, hp)} if kind == "weight-grad" else {"BK": min(bk, hp)}),
                 **({"ONCHIP": onchip} if kind == "backward" else {})}
    source = ASTSource(fn=kernel, signature=_signature(kernel, weight_dtype, constants), constexprs=constants)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})
    with tempfile.TemporaryDirectory() as folder:
        ptx = os.path.join(folder, "kernel.ptx")
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        suffix = "a" if arch >= 90 else ""
        report = subprocess.run([_ptxas(arch), f"-arch=sm_{arch}{suffix}", "-v", ptx, "-o", ptx + ".cubin"],
                                capture_output=True, text=True, check=True).stderr
    registers = re.search(r"Used (\d+) registers", report)
    spills = re.search(r"(\d+) bytes spill stores", report)
    return {"shared_bytes": int(compiled.metadata.shared), "registers": int(registers.group(1)) if registers else None,
            "spill_bytes": int(spills.group(1)) if spills else 0}


def check(tiles, hidden: int, weight_dtype: str, arch: int, weight_grad: str = "matmul",
          forward_only: bool = False) -> dict:
    """Every kernel for one tile choice (with MOLSCALE_FUSED_WGRAD's `weight_grad`; ``forward_only``: the forward
    kernels alone, as a forward that is not differentiated runs them), and whether all fit the architecture's
    shared memory."""
    from molscale.trainer.model.fused_edges import COORDINATE, MESSAGE
    onchip = weight_grad == "onchip"
    kinds = ("forward", "backward", "weight-grad") if onchip else ("forward", "backward")
    kinds = ("forward",) if forward_only else kinds
    kernels = {f"{kind}-{name}": compile_kernel(kind, mode, tiles, hidden, weight_dtype, arch, onchip)
               for kind in kinds for name, mode in (("message", MESSAGE), ("coordinate", COORDINATE))}
    limit = SHARED_LIMIT.get(arch)
    fits = None if limit is None else all(k["shared_bytes"] <= limit for k in kernels.values())
    return {"tiles": list(tiles), "use": "forward only" if forward_only else "training", "arch": arch,
            "hidden": hidden, "dtype": weight_dtype, "weight_grad": weight_grad,
            "kernels": kernels,
            "shared_limit": limit, "fits": fits, "spill_bytes": sum(k["spill_bytes"] for k in kernels.values())}


def _tiles(text: str) -> tuple[int, int, int, int]:
    parts = tuple(int(p) for p in text.split(","))
    if len(parts) != 4:
        raise argparse.ArgumentTypeError(f"{text!r}: give rows,columns,features,warps")
    return parts


def main(argv=None) -> int:
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns when unset; 1 is its default
    p = argparse.ArgumentParser(prog="python -m trainer.kernel_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10: 80 (A100), 90 (H100/H200)")
    p.add_argument("--hidden", type=int, default=256, help="model.hidden")
    p.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16",
                   help="the H x H products' dtype: bf16 (autocast) or fp32 (TF32)")
    p.add_argument("--tiles", type=_tiles, nargs="*", default=None,
                   help="rows,columns,features,warps per program, every kernel (default: the GPU defaults, the "
                        "training tiles for every kernel and the forward-only tiles for the forward kernels)")
    p.add_argument("--weight-grad", choices=["matmul", "onchip"], default="matmul",
                   help="how the backward reduces W_2's gradient (MOLSCALE_FUSED_WGRAD); onchip adds its kernel")
    p.add_argument("--json", action="store_true", help="one JSON line per tile choice")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("error: TRITON_INTERPRET=1 is set: unset it to compile for a GPU", file=sys.stderr)
        return 2
    try:
        import triton  # noqa: F401
    except ImportError:
        print("error: triton is not installed (pip install 'molscale[gpu]')", file=sys.stderr)
        return 2
    from molscale.trainer.model.fused_edges import _gpu_tiles_from_env
    choices = [(tiles, False) for tiles in args.tiles] if args.tiles else \
        [(_gpu_tiles_from_env(True), False), (_gpu_tiles_from_env(False), True)]
    for tiles, forward_only in choices:
        result = check(tiles, args.hidden, args.dtype, args.arch, args.weight_grad, forward_only)
        if args.json:
            print(json.dumps(result))
            continue
        verdict = {True: "fits", False: "DOES NOT FIT", None: "limit unknown"}[result["fits"]]
        print(f"tiles {','.join(map(str, tiles))} ({result['use']}) on sm_{args.arch}, H {args.hidden}, "
              f"{args.dtype}, {args.weight_grad} weight gradient: {verdict}")
        for name, k in result["kernels"].items():
            print(f"  {name:20s} shared {k['shared_bytes'] / 1024:7.1f} KiB  registers {k['registers']}  "
                  f"spills {k['spill_bytes']} B")
    return 0


if __name__ == "__main__":
    sys.exit(main())
