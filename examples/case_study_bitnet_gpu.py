"""Case study: microsoft/BitNet's gpu/ code (packer, quantizers, decode kernel) checked with refbitnet's oracle.

    python examples/case_study_bitnet_gpu.py --bitnet-dir ~/src/BitNet
    python examples/case_study_bitnet_gpu.py --bitnet-dir ~/src/BitNet \\
        --kernel-lib ~/src/BitNet/gpu/bitnet_kernels/libbitnet.so          # + the CUDA decode kernel
    python examples/case_study_bitnet_gpu.py --bitnet-dir ~/src/BitNet --compiled     # + torch.compile'd quantizer

--bitnet-dir is your own checkout of https://github.com/microsoft/BitNet (its root, or its gpu/ folder).
--kernel-lib is the library you built from its gpu/bitnet_kernels (``bash compile.sh`` there, as its
README says); this script builds nothing and ships none of their code: it loads it from your checkout.

What it checks, each against refbitnet.testing:

1. the packer, ``gpu/pack_weight.py: convert_weight_int8_to_int2``, against ``pack_bitnet_gpu`` (and back
   through ``unpack_bitnet_gpu``), for the four weight shapes of BitNet b1.58 2B4T;
2. the quantizers: the weight quantizer of ``gpu/convert_checkpoint.py`` (``quant_weight_int8``, a
   function nested inside ``convert_ts_checkpoint``) against ``quantize_weights``, and the activation
   quantizer ``BitLinearKernel.quant_input`` of ``gpu/model.py`` against ``quantize_activations``.
   Neither can be imported as it stands (the first is nested; importing model.py loads xformers and
   ``bitnet_kernels/libbitnet.so`` relative to the working directory), so the two function bodies are
   read from your files with ``ast`` and run as written, without their ``@torch.compile`` decorator
   (eager torch). Their model runs the activation quantizer under ``torch.compile``, which keeps some of
   eager's bf16 roundings and not others: --compiled also runs it compiled and reports how it compares;
3. with --kernel-lib, on a CUDA GPU: the decode kernel ``bitlinear_int8xint2`` (M = 1 token) for each
   2B4T projection. It is given refbitnet's own int8 activations xq and scale s, and the codes packed by
   their packer; its bf16 output is compared bit for bit with refbitnet's float32 reference
   ``reference_bitlinear`` rounded to bf16 (nearest, ties to even, as the kernel's conversion rounds).
   The input x is drawn so that refbitnet's s is a bf16 value (the kernel reads s as bf16), and the
   weight scales are bf16 as their converter stores them, so both sides compute from the same numbers.

The fused projections carry one scale per part (q, k, v: rows 2560 / 640 / 640; gate, up: 6912 / 6912).
The kernel picks a row's scale as ``ws[row / (N / ws_num)]``, i.e. by equal parts of N; the script also
evaluates that rule in NumPy, so a difference can be told apart from any other. gpu/test.py, their own
test, sets every scale to 1, where the rule cannot show; the script repeats that setting too.

Exit status: 0 when every check agrees with the reference, 1 when the oracle found a difference, 2 for
bad arguments (a missing or wrong --bitnet-dir, an unusable --kernel-lib).
"""

from __future__ import annotations

import argparse
import ast
import ctypes
import importlib.util
import os
import subprocess
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir))

from refbitnet.bf16 import f32_to_bf16, round_to_bf16  # noqa: E402
from refbitnet.testing import (Numerics, compare_tensor, pack_bitnet_gpu, quantize_activations,  # noqa: E402
                               quantize_weights, reference_bitlinear, unpack_bitnet_gpu)

# ---- BitNet b1.58 2B4T's projections as microsoft/BitNet gpu/ lays them out ------------------------------
# name -> (K, parts): the rows of each part, in the order the fused weight stacks them, and ws_num, the
# number of equal parts the kernel's dispatch in bitnet_kernels.cu divides N into for the scale index.
D, KV, F = 2560, 640, 6912                       # hidden size, k (and v) rows = 5 heads x 128, FFN size
PROJECTIONS = {
    "q/k/v fused (wqkv)": dict(k=D, parts={"q": D, "k": KV, "v": KV}, ws_num=3),
    "o_proj (wo)": dict(k=D, parts={"o": D}, ws_num=1),
    "gate/up fused (w13)": dict(k=D, parts={"gate": F, "up": F}, ws_num=2),
    "down_proj (w2)": dict(k=F, parts={"down": D}, ws_num=1),
}
WS_SLOTS = 4                                     # their converter stores 4 bf16 scales per projection
THEIR_FILES = ("pack_weight.py", "model.py", "convert_checkpoint.py")


class CaseStudyError(Exception):
    """Bad arguments or an unusable third-party checkout: reported in one line, exit status 2."""


# ====================================================================================== pure rules
def kernel_scale_index(n: int, ws_num: int) -> np.ndarray:
    """The kernel's scale index per output row: ws_idx = out_idx / (N / ws_num), integer division -> [N]."""
    return np.arange(n) // (n // ws_num)


def part_scale_index(parts) -> np.ndarray:
    """The part each output row belongs to, for parts of the given row counts stacked in order -> [N]."""
    sizes = list(parts)
    return np.repeat(np.arange(len(sizes)), sizes)


def rows_scaled_differently(parts, ws_num: int, scales) -> np.ndarray:
    """Rows whose scale under the kernel's equal-parts index differs from their own part's scale -> [r]."""
    scales = np.asarray(scales, dtype=np.float32)
    padded = np.concatenate([scales, np.zeros(max(0, ws_num - len(scales)), np.float32)])
    own = padded[part_scale_index(parts)]
    kernel = padded[kernel_scale_index(sum(parts), ws_num)]
    return np.flatnonzero(own != kernel)


def row_ranges(rows) -> str:
    """Sorted row indices -> "1280-3199" style ranges ("none" if empty)."""
    rows = np.asarray(rows)
    if rows.size == 0:
        return "none"
    breaks = np.flatnonzero(np.diff(rows) != 1)
    starts = np.concatenate([[rows[0]], rows[breaks + 1]])
    ends = np.concatenate([rows[breaks], [rows[-1]]])
    return ", ".join(f"{a}" if a == b else f"{a}-{b}" for a, b in zip(starts, ends))


def input_with_bf16_scale(rng: np.random.Generator, k: int, tokens: int = 1) -> np.ndarray:
    """x float32 [T, K] (normal, with a few outlier channels) whose refbitnet activation scales s are exactly
    bf16 values, so a kernel that reads s in bf16 gets the very s the reference divides by.

    s = 127 * fl(1 / m) for m = max|x| of a row: 127 * fl(1 / m) does not reach every bf16 value, so we try
    the bf16 values next to the row's natural s, search the float32 m next to 127 / s for one that gives it
    back, then set the row's largest |x| to that m.
    """
    rows = []
    for _ in range(tokens):
        x = rng.standard_normal(k).astype(np.float32)                  # [K]
        x[rng.choice(k, 8, replace=False)] *= np.float32(8.0)          # outlier channels set max|x|
        natural = round_to_bf16(np.float32(127.0) / np.max(np.abs(x)).reshape(1))[0]
        for step in (0, 1, -1, 2, -2, 3, -3):                          # bf16 values next to the natural s
            target = (natural.view(np.uint32) + np.uint32(step << 16) if step >= 0 else
                      natural.view(np.uint32) - np.uint32(-step << 16)).view(np.float32)
            near = np.float32(127.0) / target
            cands = (near.view(np.uint32) + np.arange(-64, 65)).astype(np.uint32).view(np.float32)  # [129]
            hits = cands[quantize_activations(cands[:, None])[1] == target]
            if hits.size:
                m = hits[np.argmin(np.abs(hits - near))]
                break
        else:
            raise RuntimeError(f"no float32 max|x| gives a bf16 scale next to {natural}")
        i = int(np.argmax(np.abs(x)))
        x = np.clip(x, -m, m)
        x[i] = np.copysign(m, x[i])
        rows.append(x)
    x = np.stack(rows)                                                 # [T, K]
    s = quantize_activations(x)[1]                                     # [T]
    assert np.array_equal(round_to_bf16(s), s), s
    return x


def reference_bf16(x: np.ndarray, codes: np.ndarray, row_scales: np.ndarray):
    """refbitnet's reference BitLinear with one scale per output row, rounded to bf16.
    x float32 [T, K], codes int8 [N, K], row_scales float32 [N] -> (y bf16 bits uint16 [T, N], BitLinearOutput)."""
    out = reference_bitlinear(x, codes, "codes", weight_scale=row_scales)
    return f32_to_bf16(out.y), out


def epilogue_with_index(out, scales, index) -> np.ndarray:
    """The reference's integers (acc, s) with the scale of each row picked by index [N] from scales (padded
    with zeros to 4 slots as their converter stores them): bf16((acc / s) * ws[index]), float32 ops in the
    kernel's order -> bf16 bits uint16 [T, N]."""
    padded = np.zeros(WS_SLOTS, np.float32)
    padded[:len(scales)] = scales
    y = (out.acc.astype(np.float32) / out.s[:, None]) * padded[index]   # [T, N]
    return f32_to_bf16(y)


def epilogue_with_kernel_index(out, scales, parts, ws_num: int) -> np.ndarray:
    """epilogue_with_index with the kernel's index ws[row / (N / ws_num)] -> bf16 bits uint16 [T, N]."""
    return epilogue_with_index(out, scales, kernel_scale_index(sum(parts), ws_num))


def ternary_weights(rng: np.random.Generator, parts: dict, k: int):
    """Float weights per part, each of its own spread (so the parts' scales differ, as in a trained model),
    quantized with refbitnet's quantize_weights -> (codes int8 [N, K], bf16-rounded scale per part)."""
    codes, scales = [], []
    for j, rows in enumerate(parts.values()):
        w = (rng.standard_normal((rows, k)) * (0.02 * (1.0 + 0.37 * j))).astype(np.float32)
        c, gamma = quantize_weights(w)
        codes.append(c)
        scales.append(round_to_bf16(np.float32(gamma).reshape(1))[0])
    return np.concatenate(codes), np.array(scales, np.float32)


# ====================================================================================== their code
def find_gpu_dir(path: str) -> str:
    """The gpu/ folder of a microsoft/BitNet checkout (path is its root or gpu/ itself); raises CaseStudyError."""
    if not path or not os.path.isdir(path):
        raise CaseStudyError(f"--bitnet-dir: expected a checkout of microsoft/BitNet, found no folder {path!r}")
    for cand in (os.path.join(path, "gpu"), path):
        if all(os.path.isfile(os.path.join(cand, f)) for f in THEIR_FILES):
            return os.path.abspath(cand)
    raise CaseStudyError(f"--bitnet-dir: expected a checkout of microsoft/BitNet (gpu/pack_weight.py, "
                         f"gpu/model.py, gpu/convert_checkpoint.py), found none of them under {path!r}")


def checkout_commit(gpu_dir: str) -> str:
    try:
        r = subprocess.run(["git", "-C", gpu_dir, "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown (git not available)"
    return r.stdout.strip() if r.returncode == 0 else "unknown (not a git checkout)"


def load_packer(gpu_dir: str):
    """gpu/pack_weight.py imported from the user's checkout -> convert_weight_int8_to_int2."""
    path = os.path.join(gpu_dir, "pack_weight.py")
    spec = importlib.util.spec_from_file_location("bitnet_gpu_pack_weight", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "convert_weight_int8_to_int2"):
        raise CaseStudyError(f"--bitnet-dir: {gpu_dir}/pack_weight.py has no convert_weight_int8_to_int2")
    return module.convert_weight_int8_to_int2


def _function_from_file(path: str, outer: str, name: str, namespace: dict):
    """The function `name` defined inside class or function `outer` of the file at path, compiled from the
    file's own source without decorators (their module-level imports are not run)."""
    tree = ast.parse(open(path, encoding="utf-8").read(), filename=path)
    for node in ast.walk(tree):
        if isinstance(node, (ast.ClassDef, ast.FunctionDef)) and node.name == outer:
            for inner in ast.walk(node):
                if isinstance(inner, ast.FunctionDef) and inner.name == name:
                    inner.decorator_list = []
                    module = ast.fix_missing_locations(ast.Module(body=[inner], type_ignores=[]))
                    exec(compile(module, path, "exec"), namespace)
                    return namespace[name]
    raise CaseStudyError(f"--bitnet-dir: expected {outer}.{name} in {path}, found none (another BitNet version?)")


def load_quantizers(gpu_dir: str, torch):
    """(quant_weight_int8(w) -> (codes, bf16 scale [1]), quant_input(x) -> (xq int8, s)) from the user's files."""
    qw = _function_from_file(os.path.join(gpu_dir, "convert_checkpoint.py"), "convert_ts_checkpoint",
                             "quant_weight_int8", {"torch": torch})
    qi = _function_from_file(os.path.join(gpu_dir, "model.py"), "BitLinearKernel", "quant_input", {"torch": torch})
    return qw, (lambda x: qi(None, x))


def load_kernel(path: str):
    """bitlinear_int8xint2 from the user's library; raises CaseStudyError if it cannot be loaded."""
    if not os.path.isfile(path):
        raise CaseStudyError(f"--kernel-lib: expected the library built from gpu/bitnet_kernels (libbitnet.so), "
                             f"found no file {path!r}")
    try:
        lib = ctypes.CDLL(os.path.abspath(path))
        fn = lib.bitlinear_int8xint2
    except (OSError, AttributeError) as e:
        raise CaseStudyError(f"--kernel-lib: expected a library exporting bitlinear_int8xint2, "
                             f"found {path!r} ({e})")
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int] * 3 + [ctypes.c_void_p]
    return fn


# ====================================================================================== checks
def check_packer(packer, torch, rng) -> bool:
    print("packer: gpu/pack_weight.py convert_weight_int8_to_int2 vs refbitnet.testing.pack_bitnet_gpu")
    ok = True
    for name, p in PROJECTIONS.items():
        n, k = sum(p["parts"].values()), p["k"]
        codes = rng.integers(-1, 2, size=(n, k), dtype=np.int8)           # [N, K]
        theirs = packer(torch.from_numpy(codes)).numpy()                  # int8 [N, K/4]
        ours = pack_bitnet_gpu(codes)                                     # int8 [N, K/4]
        same = theirs.shape == ours.shape and theirs.dtype == ours.dtype and np.array_equal(theirs, ours)
        back = same and np.array_equal(unpack_bitnet_gpu(theirs), codes)
        if same and back:
            print(f"  {name} [{n}, {k}]: identical, {theirs.size} bytes; unpack_bitnet_gpu gives the codes back")
        else:
            ok = False
            diff = int(np.count_nonzero(theirs != ours)) if theirs.shape == ours.shape else theirs.size
            print(f"  {name} [{n}, {k}]: DIFFERENT, {diff} of {ours.size} bytes "
                  f"(theirs {theirs.dtype} {list(theirs.shape)}, ours {ours.dtype} {list(ours.shape)})")
    return ok


def check_quantizers(quant_weight, quant_input, torch, rng, compiled_device=None) -> bool:
    print("quantizers (eager torch, decorators removed)")
    ok = True
    w = (rng.standard_normal((D, D)) * 0.02).astype(np.float32)          # [N, K]
    codes, scale = quant_weight(torch.from_numpy(w))
    ref_codes, gamma = quantize_weights(w)
    n_diff = int(np.count_nonzero(codes.numpy() != ref_codes))
    their_scale = float(scale.float()[0])
    ref_scale = float(round_to_bf16(np.float32(gamma).reshape(1))[0])
    good = n_diff == 0 and their_scale == ref_scale
    ok &= good
    print(f"  weights  convert_checkpoint.py quant_weight_int8 vs quantize_weights, [{D}, {D}] float32: "
          f"{'identical' if good else 'DIFFERENT'}: {n_diff} of {w.size} codes differ; scale {their_scale!r} "
          f"(bf16) vs gamma {float(gamma)!r} -> bf16 {ref_scale!r}")

    x = rng.standard_normal((8, D)).astype(np.float32)                   # [S, K]
    x[:, rng.choice(D, 4, replace=False)] *= 20.0
    xq, s = quant_input(torch.from_numpy(x))
    ref_xq, ref_s = quantize_activations(x)
    n_xq = int(np.count_nonzero(xq.numpy() != ref_xq))
    n_s = int(np.count_nonzero(s.numpy().reshape(-1) != ref_s))
    check = compare_tensor("xq", ref_xq.astype(np.float32), xq.numpy().astype(np.float32), atol=0.0, rtol=0.0)
    good = n_xq == 0 and n_s == 0 and check.ok
    ok &= good
    print(f"  activations model.py BitLinearKernel.quant_input vs quantize_activations, [8, {D}] float32: "
          f"{'identical' if good else 'DIFFERENT'}: {n_xq} of {x.size} codes, {n_s} of {len(ref_s)} scales differ")

    xb = torch.from_numpy(x).to(torch.bfloat16)                          # their model runs in bf16
    xq_b, s_b = quant_input(xb)                                          # eager: every op rounded to bf16
    eager_bf16 = Numerics(dtype="bfloat16", quant_dtype="bfloat16")
    for label, numerics in (("Numerics(dtype='bfloat16', quant_dtype='bfloat16')", eager_bf16),
                            ("preset 'bitnet-gpu'", "bitnet-gpu")):
        ref_xq_b, ref_s_b = quantize_activations(xb, numerics)
        n_xq_b = int(np.count_nonzero(xq_b.numpy() != ref_xq_b))
        n_s_b = int(np.count_nonzero(s_b.float().numpy().reshape(-1) != ref_s_b))
        good = n_xq_b == 0 and n_s_b == 0
        if numerics is eager_bf16:
            ok &= good
        print(f"  activations in bf16 (eager) vs quantize_activations(x, {label}): "
              f"{'identical' if good else 'different'}: {n_xq_b} of {x.size} codes, {n_s_b} of {len(ref_s_b)} "
              f"scales differ")
    if compiled_device is not None:
        compare_compiled(quant_input, torch, xb, xq_b, compiled_device)
    return ok


def compare_compiled(quant_input, torch, xb, xq_eager, device: str) -> None:
    """Their activation quantizer under torch.compile, as gpu/model.py runs it, on bf16 input xb [S, K]:
    compared with the eager one and with refbitnet's 'bitnet-gpu' preset. Informative only (no exit status):
    inductor decides which bf16 roundings of the eager chain it keeps."""
    xq_c, s_c = torch.compile(quant_input)(xb.to(device))
    xq_c, s_c = xq_c.cpu().numpy(), s_c.float().cpu().numpy().reshape(-1)
    ref_xq, ref_s = quantize_activations(xb, "bitnet-gpu")
    print(f"  activations in bf16 under torch.compile ({device}, as gpu/model.py runs them), s returned as bf16:")
    print(f"      vs eager: {int(np.count_nonzero(xq_c != xq_eager.numpy()))} of {xq_c.size} codes differ")
    print(f"      vs preset 'bitnet-gpu': {int(np.count_nonzero(xq_c != ref_xq))} of {xq_c.size} codes differ; "
          f"s equals the preset's s rounded to bf16 in {int(np.count_nonzero(s_c == round_to_bf16(ref_s)))} "
          f"of {len(ref_s)} rows (and the preset's float32 s itself in {int(np.count_nonzero(s_c == ref_s))})")


def run_kernel(kernel, torch, xq, packed, s, scales, n: int, k: int) -> np.ndarray:
    """One call of their decode kernel for one token, xq int8 [1, K] -> bf16 bits uint16 [1, N]. The output
    is prefilled with NaN: the kernel returns without writing for a shape it has no instance for."""
    dev = torch.device("cuda")
    a = torch.from_numpy(np.ascontiguousarray(xq)).to(dev)                     # int8 [1, K]
    b = torch.from_numpy(np.ascontiguousarray(packed)).to(dev)                 # int8 [N, K/4]
    out = torch.full((1, n), float("nan"), dtype=torch.bfloat16, device=dev)  # [1, N]
    s_t = torch.tensor([float(s)], dtype=torch.bfloat16, device=dev)          # [1]
    ws = np.zeros(WS_SLOTS, np.float32)
    ws[:len(scales)] = scales
    ws_t = torch.from_numpy(ws).to(torch.bfloat16).to(dev)                    # [4]
    assert float(s_t[0]) == float(s) and np.array_equal(ws_t.float().cpu().numpy(), ws)   # both exact in bf16
    stream = torch.cuda.current_stream()
    kernel(a.data_ptr(), b.data_ptr(), out.data_ptr(), s_t.data_ptr(), ws_t.data_ptr(), 1, n, k,
           stream.cuda_stream)
    torch.cuda.synchronize()
    bits = out.view(torch.int16).cpu().numpy().view(np.uint16)
    if np.isnan(out.float().cpu().numpy()).any():
        raise RuntimeError(f"the kernel left its output unwritten for N={n}, K={k} (no instance for this shape)")
    return bits


def check_kernel(kernel, packer, torch, rng, tokens: int = 4) -> bool:
    print(f"decode kernel: bitlinear_int8xint2 (M = 1, called for each of {tokens} tokens) vs "
          f"refbitnet.testing.reference_bitlinear rounded to bf16")
    ok = True
    for name, p in PROJECTIONS.items():
        parts, k, ws_num = p["parts"], p["k"], p["ws_num"]
        n = sum(parts.values())
        codes, scales = ternary_weights(rng, parts, k)                  # [N, K], [parts]
        x = input_with_bf16_scale(rng, k, tokens)                       # [T, K]
        packed = packer(torch.from_numpy(codes)).numpy()                # their packer, as their converter
        variants = [("weight scales " + ", ".join(f"{q}={v:.6g}" for q, v in zip(parts, scales)), scales)]
        if len(parts) > 1:
            variants.append(("every weight scale 1 (as gpu/test.py sets them)", np.ones_like(scales)))
        for label, sc in variants:
            row_scales = sc[part_scale_index(parts.values())]          # [N]
            ref_bits, out = reference_bf16(x, codes, row_scales)        # [T, N]
            got = np.concatenate([run_kernel(kernel, torch, out.xq[t:t + 1], packed, out.s[t], sc, n, k)
                                  for t in range(tokens)])              # [T, N]
            bad = got != ref_bits                                       # [T, N]
            bad_rows = np.flatnonzero(bad.any(axis=0))
            check = compare_tensor(name, round_to_bf16(out.y), _bits_to_f32(got), atol=0.0, rtol=0.0)
            rule_same = np.array_equal(got, epilogue_with_kernel_index(out, sc, parts.values(), ws_num))
            print(f"  {name} [{n}, {k}], {label}:")
            if bad_rows.size == 0:
                print(f"      all {n} rows bit-identical for all {tokens} tokens; {check.line()}")
            else:
                ok = False
                predicted = rows_scaled_differently(parts.values(), ws_num, sc)
                zero = int(np.count_nonzero(out.acc[:, predicted] == 0))
                print(f"      DIFFERS on {bad_rows.size} of {n} rows: {row_ranges(bad_rows)} "
                      f"({int(bad.sum())} of {bad.size} outputs; the rest are bit-identical)")
                print(f"      {check.line()}")
                print(f"      rows that the kernel's index ws[row / (N / {ws_num})] gives another part's scale: "
                      f"{row_ranges(predicted)} ({predicted.size} rows); outputs among them with acc = 0, "
                      f"equal either way: {zero}")
            print(f"      kernel == bf16((acc / s) * ws[row / {n // ws_num}]) (the reference's integers with the "
                  f"kernel's scale index) on all {got.size} outputs: {rule_same}")
    return ok


def _bits_to_f32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


# ====================================================================================== main
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--bitnet-dir", required=True, help="your checkout of microsoft/BitNet (root or gpu/)")
    p.add_argument("--kernel-lib", default=None,
                   help="libbitnet.so you built from gpu/bitnet_kernels (needs a CUDA GPU); "
                        "omit to skip the kernel")
    p.add_argument("--compiled", action="store_true",
                   help="also run their activation quantizer under torch.compile, as gpu/model.py does "
                        "(needs a working torch.compile: a C++ compiler on the CPU, Triton on a GPU)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random codes, weights and inputs")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        gpu_dir = find_gpu_dir(args.bitnet_dir)
        try:
            import torch
        except ImportError:
            raise CaseStudyError("torch: microsoft/BitNet's gpu/ code needs torch; found none (pip install torch)")
        kernel = None
        if args.kernel_lib is not None:
            if not torch.cuda.is_available():
                raise CaseStudyError(f"--kernel-lib: the decode kernel needs a CUDA GPU, found torch "
                                     f"{torch.__version__} with none available")
            kernel = load_kernel(args.kernel_lib)
        packer = load_packer(gpu_dir)
        quant_weight, quant_input = load_quantizers(gpu_dir, torch)
    except CaseStudyError as e:
        print(f"case_study_bitnet_gpu: {e}", file=sys.stderr)
        return 2

    import refbitnet
    print(f"microsoft/BitNet gpu/ checked with refbitnet {refbitnet.__version__} (refbitnet.testing)")
    print(f"  checkout {gpu_dir}, commit {checkout_commit(gpu_dir)}")
    print(f"  torch {torch.__version__}, numpy {np.__version__}, python {sys.version.split()[0]}")
    if kernel is not None:
        prop = torch.cuda.get_device_properties(0)
        print(f"  CUDA {torch.version.cuda}, {prop.name} (sm_{prop.major}{prop.minor}), kernel {args.kernel_lib}")
    rng = np.random.default_rng(args.seed)
    ok = check_packer(packer, torch, rng)
    compiled_device = ("cuda" if kernel is not None else "cpu") if args.compiled else None
    ok &= check_quantizers(quant_weight, quant_input, torch, rng, compiled_device)
    if kernel is None:
        print("decode kernel: skipped (no --kernel-lib)")
    else:
        ok &= check_kernel(kernel, packer, torch, rng)
    print("all checks agree with the reference" if ok else
          "the oracle found differences (see DIFFERENT / DIFFERS)")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
