"""Compiles every Triton kernel variant robe_dist launches for a GPU target, without a GPU.

Triton lowers a kernel to PTX and ``ptxas`` (shipped in the triton wheel) assembles it on any
machine, so compile-time errors (types, shapes, unsupported operations) show up on CPU-only CI,
where the interpreter (``TRITON_INTERPRET=1``) checks the kernels' results but not their
compilation. Run in a process without ``TRITON_INTERPRET`` (tests/unit/test_triton_kernels.py does)::

    python -m robe_dist.kernels.compile_check            # sm_90 (H100/H200) and sm_80 (A100)
    python -m robe_dist.kernels.compile_check --arch 90
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
import time
from typing import Dict, Iterator, Tuple


def variants() -> Iterator[Tuple[str, object, Dict[str, str], Dict[str, object]]]:
    """``(name, kernel, signature, constexprs)`` for every combination the launchers use (the block
    starts are int32 or int64, ``robe_dist.ops.starts_dtype``: each width rides along with another
    type's, so both compile without doubling the variants)."""
    from robe_dist.kernels import triton_lookup as tk

    for array, ids, offsets, hash_mode, weighted, (z, nb) in itertools.product(
        ("fp32", "bf16"), ("i64", "i32"), ("i64", "i32"), (0, 1), (False, True), ((32, 4), (1, 128), (3, 2))
    ):
        zp, nbp = 1 << (z - 1).bit_length(), 1 << (nb - 1).bit_length()
        sig = dict(array_ptr=f"*{array}", values_ptr=f"*{ids}", weights_ptr=f"*{array}", offsets_ptr=f"*{offsets}",
                   meta_ptr="*i64", out_ptr=f"*{array}", starts_ptr=f"*{ids}", status_ptr="*i64", batch="i32",
                   out_dim="i32", num_values="i64", num_bags="i64", num_starts="i64", align="i64", pa="i64", pb="i64",
                   pc="i64", pp="i64")  # fmt: skip
        const = dict(HASH=hash_mode, Z=z, ZP=zp, NBP=nbp, MB=nb, HAS_WEIGHTS=weighted)
        yield f"forward[{array},{ids},{offsets},hash={hash_mode},w={weighted},Z={z}]", tk._forward_kernel, sig, const
    # as the launcher passes them: Python ints below 2^31 as i32, and 1 as a constant (an array of
    # exactly one block has num_starts == 1; the paper constants are 1 in the universal mapping;
    # block_align is 1 unless set)
    for hash_mode, align in itertools.product((0, 1), (1, 16)):
        sig = dict(array_ptr="*fp32", values_ptr="*i64", weights_ptr="*fp32", offsets_ptr="*i64", meta_ptr="*i64",
                   out_ptr="*fp32", starts_ptr="*i32", status_ptr="*i64", batch="i32", out_dim="i32", num_values="i32",
                   pa="i32", pb="i32", pc="i32", pp="i32")  # fmt: skip
        const = dict(num_starts=1, HASH=hash_mode, Z=32, ZP=32, NBP=4, MB=4, HAS_WEIGHTS=False)
        if align == 1:  # (and one bag of one key: batch 1 of one feature, num_bags the constant 1)
            const["align"] = 1
            const["num_bags"] = 1
        else:
            sig["align"] = "i32"
            sig["num_bags"] = "i32"
        yield f"forward[launch types,num_starts=1,align={align},hash={hash_mode}]", tk._forward_kernel, sig, const
    for grad, offsets, weighted, (z, nb) in itertools.product(("fp32", "bf16"), ("i64", "i32"), (False, True), ((32, 4), (1, 128))):
        zp, nbp = 1 << (z - 1).bit_length(), 1 << (nb - 1).bit_length()
        sig = dict(grad_out_ptr=f"*{grad}", weights_ptr=f"*{grad}", offsets_ptr=f"*{offsets}", meta_ptr="*i64",
                   starts_ptr=f"*{offsets}", target_ptr="*fp32", status_ptr="*i64", alpha="fp32", batch="i32", out_dim="i32",
                   num_values="i64")  # fmt: skip
        const = dict(Z=z, ZP=zp, NBP=nbp, MB=nb, HAS_WEIGHTS=weighted)
        yield f"backward_atomic[{grad},{offsets},w={weighted},Z={z}]", tk._backward_atomic_kernel, sig, const
    for grad, weighted in itertools.product(("fp32", "bf16"), (False, True)):
        sig = dict(weights_ptr=f"*{grad}", offsets_ptr="*i64", meta_ptr="*i64", row_base_ptr="*i64", row_scale_ptr="*fp32",
                   status_ptr="*i64", batch="i32", out_dim="i32", num_values="i64")  # fmt: skip
        yield f"row_info[{grad},w={weighted}]", tk._row_info_kernel, sig, dict(HAS_WEIGHTS=weighted)
    for target, mode, z in itertools.product(("fp32", "bf16"), (0, 1, 2), (32, 1)):
        sig = dict(sorted_ptr="*i32" if target == "fp32" else "*i64", order_ptr="*i64", bounds_ptr="*i64", row_base_ptr="*i64", row_scale_ptr="*fp32",
                   grad_out_ptr=f"*{target}", target_ptr=f"*{target}", state_ptr="*fp32", num_tiles="i64",
                   array_size="i64", lr="fp32", eps="fp32")  # fmt: skip
        const = dict(Z=z, MB=128 // z, T=tk.TILE, MODE=mode, CH=tk.TILE_CHUNK)
        yield f"tile[{target},mode={mode},Z={z}]", tk._tile_kernel, sig, const


def compile_all(arch: int) -> int:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    failures = 0
    for name, kernel, signature, constexprs in variants():
        sig = dict(signature, **{k: "constexpr" for k in constexprs})
        t0 = time.perf_counter()
        try:
            compiled = triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=constexprs),
                                      target=GPUTarget("cuda", arch, 32))  # fmt: skip
            ok = "cubin" in compiled.asm
        except Exception as e:  # noqa: BLE001 - report every variant
            ok, failures = False, failures + 1
            print(f"FAIL sm_{arch} {name}: {type(e).__name__}: {e}", flush=True)
        if ok:
            print(f"ok   sm_{arch} {name} ({time.perf_counter() - t0:.2f} s)", flush=True)
    return failures


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", type=int, nargs="+", default=[90, 80], help="CUDA compute capabilities (90: H100/H200)")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("compile_check: unset TRITON_INTERPRET (the interpreter does not compile)", file=sys.stderr)
        return 2
    failures = sum(compile_all(a) for a in args.arch)
    print(f"compile_check: {failures} failure(s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
