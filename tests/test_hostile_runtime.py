"""Hostile runtime inputs: token ids, prompts, generation settings, KV caches, threads, NaN/inf inside
the model, and the Numba kernel wrappers fuzzed with wrong shapes, dtypes, strides and layouts.

Every bad argument must raise a RefBitNetError subclass naming it BEFORE any kernel or BitLinear runs
(checked by replacing the BitLinear entry points with a tripwire). Values produced inside the model
(an overflow to inf in an activation) are caught by the activation quantizer, whose error must name
the layer and projection.

The kernel fuzz runs twice: here, and in a child process with NUMBA_BOUNDSCHECK=1 (and its own
NUMBA_CACHE_DIR, so bounds-checked machine code never enters or comes from the normal cache), where
any out-of-bounds access in a kernel raises IndexError instead of reading memory silently. The child
first proves that bounds checking is on (an njit function indexing past the end must raise).
"""

import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import _corrupt as C
import refbitnet
from refbitnet import kernels
from refbitnet.errors import RefBitNetError, RefBitNetTypeError, TokenizerError
from refbitnet.kernels import reference as kref
from refbitnet.layouts import pack_kernel

IN_BOUNDSCHECK_CHILD = os.environ.get("REFBITNET_BOUNDSCHECK_CHILD") == "1"


# ============================================================================ a tiny model, and a tripwire

@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return C.write_checkpoint_dir(tmp_path_factory.mktemp("runtime") / "model")


@pytest.fixture(scope="module")
def model(model_dir):
    return refbitnet.load(model_dir)


@pytest.fixture(scope="module")
def numba_model(model_dir):
    return refbitnet.load(model_dir, backend="numba")


class Tripwire(Exception):
    pass


@pytest.fixture()
def no_kernels(monkeypatch):
    """Any BitLinear (NumPy path) or Numba kernel call fails the test: validation must come first."""
    def trip(*args, **kwargs):
        raise Tripwire("a kernel ran before the argument was validated")
    import refbitnet.model as model_module
    import refbitnet.runtime as runtime_module
    monkeypatch.setattr(model_module, "bitlinear", trip)
    monkeypatch.setattr(model_module, "forward", trip)
    monkeypatch.setattr(runtime_module.FastPath, "forward", trip)
    monkeypatch.setattr(runtime_module.FusedLinear, "__call__", trip)
    monkeypatch.setattr(kernels, "bf16_matmul", trip)


# ============================================================================ token ids

BAD_IDS = {
    "negative": ([3, -1, 4], TokenizerError),
    "== vocab_size": ([3, 64], TokenizerError),
    "huge": ([2**62], TokenizerError),
    "uint64 beyond int64": (np.array([2**64 - 1], dtype=np.uint64), TokenizerError),
    "float": (np.array([1.0, 2.0]), RefBitNetTypeError),
    "bool": (np.array([True, False]), RefBitNetTypeError),
    "strings": (["1", "2"], RefBitNetTypeError),
    "a str": ("hello", RefBitNetTypeError),
    "bytes": (b"\x01\x02", RefBitNetTypeError),
    "objects": (np.array([1, None], dtype=object), RefBitNetTypeError),
    "2-D": (np.ones((2, 2), dtype=np.int64), RefBitNetError),
    "0-D": (np.int64(3), RefBitNetError),
    "empty": ([], RefBitNetError),
    "None": (None, RefBitNetError),
    "ragged": ([[1, 2], [3]], RefBitNetError),
    "complex": (np.array([1 + 0j]), RefBitNetTypeError),
}


@pytest.mark.parametrize("backend", ["numpy", "numba"])
@pytest.mark.parametrize("case", sorted(BAD_IDS))
def test_bad_token_ids(model, numba_model, no_kernels, case, backend):
    ids, error = BAD_IDS[case]
    m = model if backend == "numpy" else numba_model
    with pytest.raises(error, match="ids"):
        m.forward(ids)
    if not isinstance(ids, str):                 # generate("text") is a text prompt, encoded by the tokenizer
        with pytest.raises(error, match="ids|prompt"):
            m.generate(ids, max_new_tokens=2)


def test_ids_longer_than_the_context(model, no_kernels):
    ctx = model.config.max_position_embeddings
    with pytest.raises(RefBitNetError, match="max_position_embeddings"):
        model.forward(np.zeros(ctx + 1, dtype=np.int64))
    with pytest.raises(RefBitNetError, match="context"):
        model.generate([0] * ctx, max_new_tokens=1)
    with pytest.raises(RefBitNetError, match="context"):
        model.generate([0] * 3, max_new_tokens=ctx)


def test_text_prompts(model, no_kernels):
    tok = model.tokenizer
    with pytest.raises(RefBitNetTypeError):
        tok.encode(b"bytes")
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        tok.decode([0, 10**9])
    with pytest.raises(RefBitNetTypeError):
        tok.decode(["a"])
    bare = refbitnet.Model(model.config, model.weights)           # no tokenizer
    with pytest.raises(RefBitNetError, match="tokenizer"):
        bare.generate("hello", max_new_tokens=1)


# ============================================================================ generation settings

BAD_SETTINGS = {
    "max_new_tokens 0": (dict(max_new_tokens=0), RefBitNetError),
    "max_new_tokens -5": (dict(max_new_tokens=-5), RefBitNetError),
    "max_new_tokens 1.5": (dict(max_new_tokens=1.5), RefBitNetTypeError),
    "max_new_tokens True": (dict(max_new_tokens=True), RefBitNetTypeError),
    "max_new_tokens str": (dict(max_new_tokens="3"), RefBitNetTypeError),
    "temperature -0.1": (dict(temperature=-0.1), RefBitNetError),
    "temperature NaN": (dict(temperature=float("nan")), RefBitNetError),
    "temperature inf": (dict(temperature=float("inf")), RefBitNetError),
    "temperature str": (dict(temperature="0.7"), RefBitNetTypeError),
    "top_p 0": (dict(top_p=0.0), RefBitNetError),
    "top_p -0.5": (dict(top_p=-0.5), RefBitNetError),
    "top_p 1.01": (dict(top_p=1.01), RefBitNetError),
    "top_p NaN": (dict(top_p=float("nan")), RefBitNetError),
    "top_p str": (dict(top_p="0.9"), RefBitNetTypeError),
    "top_k -1": (dict(top_k=-1), RefBitNetError),
    "top_k 2.5": (dict(top_k=2.5), RefBitNetTypeError),
    "top_k True": (dict(top_k=True), RefBitNetTypeError),
    "seed str": (dict(seed="42"), RefBitNetTypeError),
    "seed float": (dict(seed=1.5), RefBitNetTypeError),
    "stop id out of range": (dict(stop=[10**6]), TokenizerError),
    "stop of wrong type": (dict(stop=[1.5]), RefBitNetTypeError),
    "stop empty string": (dict(stop=[""]), RefBitNetError),
}


@pytest.mark.parametrize("case", sorted(BAD_SETTINGS))
def test_bad_generation_settings(model, no_kernels, case):
    kwargs, error = BAD_SETTINGS[case]
    kwargs = {"max_new_tokens": 3, **kwargs}
    with pytest.raises(error):
        model.generate([0, 4, 5], **kwargs)
    with pytest.raises(error):
        model.generate([0, 4, 5], stream=True, **kwargs)     # raised at the call, not at the first next()


@given(temperature=st.floats(allow_nan=True, allow_infinity=True), top_p=st.floats(allow_nan=True),
       top_k=st.integers(-10**20, 10**20), max_new=st.integers(-10**20, 10**20))
def test_generation_settings_fuzzed(model, temperature, top_p, top_k, max_new):
    """Any combination either raises a RefBitNetError or generates valid ids (never anything else)."""
    max_new = max(min(max_new, 3), -3)
    try:
        ids = model.generate([0, 4], max_new_tokens=max_new, temperature=temperature, top_k=top_k,
                             top_p=top_p, seed=1)
    except RefBitNetError:
        valid = (max_new >= 1 and np.isfinite(temperature) and temperature >= 0 and 0 < top_p <= 1
                 and top_k >= 0)
        assert not valid, "valid settings were rejected"
        return
    assert 0 <= len(ids) <= max_new and all(0 <= i < model.config.vocab_size for i in ids)


# ============================================================================ KV caches

def test_cache_arguments(model, numba_model, no_kernels):
    ctx = model.config.max_position_embeddings
    for bad in (0, -1, ctx + 1, 10**30):
        with pytest.raises(RefBitNetError, match="max_tokens"):
            model.new_cache(bad)
    for bad in (1.5, "8", True, [4]):
        with pytest.raises(RefBitNetTypeError, match="max_tokens"):
            model.new_cache(bad)
    with pytest.raises(RefBitNetTypeError, match="cache"):
        model.forward([1, 2], cache={"k": 0})


def test_cache_for_a_huge_context_length(tmp_path):
    """A config.json may claim any context length; the default cache then cannot be allocated."""
    huge = refbitnet.load(C.write_checkpoint_dir(tmp_path / "huge", C.tiny_config().replace(
        max_position_embeddings=2**40)))
    with pytest.raises(RefBitNetError, match="max_tokens.*GiB"):
        huge.new_cache()
    assert huge.new_cache(4).capacity == 4


def test_cache_capacity(model):
    full = model.new_cache(2)
    model.forward([1, 2], cache=full)
    with pytest.raises(RefBitNetError, match="capacity"):
        model.forward([1], cache=full)
    assert full.length == 2                             # the failed call changed nothing


def test_cache_from_a_model_of_another_shape(model, tmp_path, no_kernels):
    other_cfg = C.tiny_config().replace(num_key_value_heads=4)
    other = refbitnet.load(C.write_checkpoint_dir(tmp_path / "other", other_cfg))
    with pytest.raises(RefBitNetError, match="cache"):
        model.forward([1, 2], cache=other.new_cache(8))


def test_cache_from_another_model_of_the_same_shape(model, tmp_path):
    other = refbitnet.load(C.write_checkpoint_dir(tmp_path / "same-shape", seed=7))
    cache = other.new_cache(8)
    other.forward([1, 2], cache=cache)
    with pytest.raises(RefBitNetError, match="another model"):
        model.forward([3], cache=cache)
    cache.reset()                                      # an emptied cache may serve any model of its shape
    assert np.array_equal(model.forward([3], cache=cache), model.forward([3]))


# ============================================================================ threads

@pytest.mark.parametrize("n", [0, -1, 10**6, 1.5, "2", True, None])
def test_bad_thread_counts(n):
    before = kernels.get_num_threads()
    with pytest.raises(RefBitNetError, match="set_num_threads"):
        kernels.set_num_threads(n)
    assert kernels.get_num_threads() == before


@pytest.mark.parametrize("value", ["0", "-2", "two", "1.5"])
def test_bad_thread_environment(value):
    code = "import refbitnet.kernels"
    out = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, REFBITNET_THREADS=value),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0, out.stderr[-500:]
    assert "RefBitNetError" in out.stderr and "REFBITNET_THREADS" in out.stderr, out.stderr[-500:]


# ============================================================================ NaN / inf inside the model

def test_nan_reaching_the_quantizer_directly():
    from refbitnet.bitlinear import bitlinear_int
    from refbitnet.quant import absmax_int8
    codes = np.zeros((4, 8), np.int8)
    for bad in (np.nan, np.inf, -np.inf):
        x = np.ones((2, 8), np.float32)
        x[1, 3] = bad
        with pytest.raises(RefBitNetError, match=r"finite.*\(1, 3\)"):
            absmax_int8(x)
        with pytest.raises(RefBitNetError, match="finite"):
            bitlinear_int(x, codes, np.float32(1))


def overflowing_model(model, backend):
    """The tiny model with o_proj's weight_scale at 3e38: finite on disk, but the residual stream
    overflows to inf inside layer 0."""
    from refbitnet.weights import model_weights
    tensors = model.release_tensors()
    tensors["model.layers.0.self_attn.o_proj.weight_scale"] = np.array([3e38], np.float32)
    return refbitnet.Model(model.config, model_weights(model.config, tensors), backend=backend)


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_overflow_inside_the_model_names_the_layer(model, backend):
    with pytest.raises(RefBitNetError, match=r"layers\.0\..*finite|finite.*layers\.0\."):
        overflowing_model(model, backend).forward([1, 2, 3])


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_overflow_inside_the_model_is_an_error(model, backend):
    with pytest.raises(RefBitNetError, match="finite"):
        overflowing_model(model, backend).forward([1, 2, 3])


def test_bad_model_arguments(model):
    with pytest.raises(RefBitNetError, match="numerics"):
        refbitnet.Model(model.config, model.weights, numerics="float")
    with pytest.raises(RefBitNetError, match="backend"):
        refbitnet.Model(model.config, model.weights, backend="gpu")
    with pytest.raises(RefBitNetTypeError, match="config"):
        refbitnet.Model(model.config.to_dict(), model.weights)


# ============================================================================ kernel wrappers, fuzzed

MUTATIONS = ["none", "dtype", "transpose", "stride", "reverse", "fortran", "ndim1", "ndim3", "list", "none_value",
             "empty", "unaligned", "readonly", "columns+", "columns-", "rows+"]


def mutate(a, how, rng):
    """One hostile variant of a valid 2-D (or 1-D) operand."""
    if how == "none":
        return a
    if how == "dtype":
        dtypes = [np.int8, np.uint8, np.int16, np.uint16, np.int32, np.float16, np.float32, np.float64,
                  np.bool_, ">f4", ">u2"]
        return a.astype(dtypes[rng.integers(len(dtypes))])
    if how == "transpose":
        return a.T
    if how == "stride":
        return np.repeat(a, 2, axis=-1)[..., ::2]               # same values and shape, non-contiguous
    if how == "reverse":
        return a[::-1]
    if how == "fortran":
        return np.asfortranarray(a)
    if how == "ndim1":
        return a.reshape(-1)
    if how == "ndim3":
        return a[None]
    if how == "list":
        return a.tolist()
    if how == "none_value":
        return None
    if how == "empty":
        return a[:0]
    if how == "unaligned":                                     # same values, data at an odd address
        buf = np.zeros(a.nbytes + 1, np.uint8)
        out = buf[1:].view(a.dtype).reshape(a.shape)
        out[...] = a
        return out
    if how == "readonly":
        out = a.copy()
        out.flags.writeable = False
        return out
    if how == "columns+":
        return np.concatenate([a, a[..., :8]], axis=-1) if a.ndim else a
    if how == "columns-":
        return a[..., :-4] if a.shape[-1] > 4 else a[..., :1]
    if how == "rows+":
        return np.concatenate([a, a[:1]]) if a.ndim else a
    raise AssertionError(how)


def is_valid(a, dtype, ndim):
    """The kernels' contract for one operand."""
    return (isinstance(a, np.ndarray) and a.dtype == np.dtype(dtype) and a.ndim == ndim
            and a.flags.c_contiguous and a.size > 0)


def check_ternary(xq, s, packed, weight_scale, with_scales):
    """Expected outcome of ternary_matmul(_acc) from the contract: None if valid, else True."""
    ok = is_valid(xq, np.int8, 2) and is_valid(packed, np.uint8, 2)
    if ok:
        k = xq.shape[1]
        ok = packed.shape[1] * 4 == k and k % 8 == 0
    if ok and with_scales:
        ok = is_valid(s, np.float32, 1) and s.shape[0] == xq.shape[0]
        n = packed.shape[0]
        if isinstance(weight_scale, np.ndarray):
            ok = ok and weight_scale.dtype == np.float32 and weight_scale.shape in ((), (1,), (n,))
        elif isinstance(weight_scale, np.generic):
            ok = ok and isinstance(weight_scale, np.float32)
        else:
            ok = ok and isinstance(weight_scale, (int, float)) and not isinstance(weight_scale, bool)
    return ok


@st.composite
def ternary_case(draw):
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    s_len = draw(st.integers(1, 5))
    k = draw(st.sampled_from([8, 16, 24, 40, 64, 136, 520]))
    n = draw(st.integers(1, 70))
    xq = rng.integers(-128, 128, size=(s_len, k), dtype=np.int8)
    codes = rng.integers(-1, 2, size=(n, k), dtype=np.int8)
    packed = pack_kernel(codes)
    s = rng.uniform(0.1, 100, size=s_len).astype(np.float32)
    ws_kind = draw(st.sampled_from(["f32", "py", "arr1", "arrN", "f64", "arrN+1", "bool", "str", "arr_i32"]))
    ws = {"f32": np.float32(0.7), "py": 0.7, "arr1": np.array([0.7], np.float32),
          "arrN": rng.uniform(0.1, 2, n).astype(np.float32), "f64": np.float64(0.7),
          "arrN+1": np.ones(n + 1, np.float32), "bool": True, "str": "0.7",
          "arr_i32": np.ones(n, np.int32)}[ws_kind]
    how = [draw(st.sampled_from(MUTATIONS)) if draw(st.booleans()) else "none" for _ in range(3)]
    return (mutate(xq, how[0], rng), mutate(s, how[1], rng) if how[1] not in ("transpose", "fortran") else s,
            mutate(packed, how[2], rng), ws, how)


def run_kernel_fuzz_case(case, with_scales):
    xq, s, packed, ws, how = case
    valid = check_ternary(xq, s, packed, ws, with_scales)
    try:
        out = kernels.ternary_matmul(xq, s, packed, ws) if with_scales else kernels.ternary_matmul_acc(xq, packed)
    except RefBitNetError:
        assert not valid, f"valid operands rejected ({how})"
        return
    assert valid, f"invalid operands accepted ({how})"
    xq, packed = np.ascontiguousarray(xq), np.ascontiguousarray(packed)
    if with_scales:
        ws_ref = np.float32(ws) if not isinstance(ws, np.ndarray) else ws.reshape(-1) if ws.size > 1 else \
            np.float32(ws.reshape(()))
        assert np.array_equal(out, kref.ternary_matmul_reference(xq, np.ascontiguousarray(s), packed, ws_ref))
    else:
        assert np.array_equal(out, kref.ternary_matmul_acc_reference(xq, packed))


@settings(max_examples=100)
@given(case=ternary_case(), with_scales=st.booleans())
def test_kernel_wrappers_fuzz_ternary(case, with_scales):
    run_kernel_fuzz_case(case, with_scales)


@st.composite
def lm_head_case(draw):
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    s_len, k, v = draw(st.integers(1, 4)), draw(st.sampled_from([1, 7, 16, 33, 64])), draw(st.integers(1, 70))
    x = rng.standard_normal((s_len, k)).astype(np.float32)
    table = (rng.standard_normal((v, k)).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
    how = [draw(st.sampled_from(MUTATIONS)) if draw(st.booleans()) else "none" for _ in range(2)]
    return mutate(x, how[0], rng), mutate(table, how[1], rng), how


@settings(max_examples=100)
@given(case=lm_head_case())
def test_kernel_wrappers_fuzz_lm_head(case):
    x, table, how = case
    valid = is_valid(x, np.float32, 2) and is_valid(table, np.uint16, 2) and table.shape[1] == x.shape[1]
    try:
        out = kernels.bf16_matmul(x, table)
    except RefBitNetError:
        assert not valid, f"valid operands rejected ({how})"
        return
    assert valid, f"invalid operands accepted ({how})"
    assert np.array_equal(out, kref.bf16_matmul_reference(x, table))


def test_packed_code_3_is_read_not_out_of_bounds():
    """The kernel layout's byte values are not checked per call (documented in refbitnet.kernels): a field
    3 reads as weight +2. It stays in bounds and the result is that arithmetic, not garbage."""
    xq = np.ones((1, 8), np.int8)
    packed = np.full((2, 2), 0xFF, np.uint8)                  # every field 3 -> w = +2
    assert np.array_equal(kernels.ternary_matmul_acc(xq, packed), [[16, 16]])


def test_boundscheck_is_on_in_the_child():
    if not IN_BOUNDSCHECK_CHILD:
        pytest.skip("runs in the NUMBA_BOUNDSCHECK=1 child only")
    from numba import njit

    @njit
    def read(a, i):
        return a[i]

    with pytest.raises(IndexError):
        read(np.zeros(4), 10)


@pytest.mark.slow                       # about 60 s: the child compiles every kernel with bounds checks
@pytest.mark.skipif(IN_BOUNDSCHECK_CHILD, reason="this is the child")
def test_kernel_fuzz_under_numba_boundscheck(tmp_path):
    """The fuzz tests again, in a process where Numba checks every index (its own, throwaway cache)."""
    env = dict(os.environ, NUMBA_BOUNDSCHECK="1", NUMBA_CACHE_DIR=str(tmp_path / "numba-cache"),
               REFBITNET_BOUNDSCHECK_CHILD="1", PYTHONPATH=str(C.REPO))
    cmd = [sys.executable, "-X", "faulthandler", "-m", "pytest", "-q", "-p", "no:cacheprovider",
           str(C.HERE / "test_hostile_runtime.py"), "-k", "kernel_wrappers_fuzz or boundscheck_is_on or code_3"]
    out = subprocess.run(cmd, env=env, cwd=str(C.REPO), capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "4 passed" in out.stdout, out.stdout[-2000:]
    assert any((tmp_path / "numba-cache").rglob("*.nbi")), "the child did not compile into its own cache"
