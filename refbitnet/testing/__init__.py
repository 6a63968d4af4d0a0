"""refbitnet as an oracle: a small, stable API for other projects' test suites.

Kernels, converters and runtimes for BitNet b1.58 check their numbers against this module:

- **layouts** -- ``encode(codes, layout, scale)`` / ``decode(data, layout, shape)`` for every packed
  layout of docs/SPEC.md §4-§5 ("codes", "hf", "kernel", "i2_s", "tq2_0", "tq1_0", "bitnet_gpu"), plus
  the ``pack_*`` / ``unpack_*`` pairs of :mod:`refbitnet.layouts` (taking tensors too), and
  ``pack_bitnet_gpu`` / ``unpack_bitnet_gpu`` (microsoft/BitNet's GPU kernel format) defined here.
- **BitLinear** -- ``reference_bitlinear(x, weight, layout, ...)`` returns the output ``y`` and the
  exact integer intermediates: ``acc`` (int32 accumulators), ``xq`` (int8 activations) and ``s``
  (per-token activation scales), so a kernel can be checked bit for bit on the integer part.
- **activations** -- ``reference_activations(model_or_path, ids)``: every named intermediate of the
  forward pass (norms, q/k/v after RoPE, attention, SubLN outputs, FFN, residuals, logits; see
  ``TRACE_TENSORS``) for a checkpoint directory, a GGUF file (bitnet.cpp I2_S or llama.cpp TQ1_0/TQ2_0)
  or a loaded Model.
- **comparison** -- ``compare_tensor(name, reference, candidate, mode=)`` exact (counts and shows the
  first mismatches), in ulps, or to a tolerance; ``compare_int8_codes`` / ``compare_ternary_codes``
  tell benign boundary flips from real differences ("N benign boundary flips, M real differences").
  ``compare_activations(reference, candidate)`` checks tensors in forward order and reports the FIRST
  layer and tensor where the candidate diverges, printing one llm.c-style line per tensor
  (``TENSOR OK, maxdiff = 3.0e-07  layers.0.q``); ``assert_activations_match`` raises an
  AssertionError naming that tensor.
- **numerics** -- ``NUMERICS`` / ``Numerics`` (from :mod:`refbitnet.quant`): the rounding rules of the
  implementations people compare against (torch, IEEE, transformers in bf16, onebitllms, microsoft/BitNet
  gpu/); the quantizers and ``reference_bitlinear`` take ``numerics=``.
- **property tests and fixtures** -- ``refbitnet.testing.strategies`` (hypothesis strategies for the
  inputs that break BitNet code) and a pytest plugin, active once refbitnet is installed (fixtures
  ``refbitnet_model``, ``refbitnet_reference``, ``refbitnet_golden``; option ``--refbitnet-model``).
- **other languages** -- ``python -m refbitnet.testing dump ...`` writes reference tensors and golden
  vectors to .safetensors (see ``refbitnet.testing.dump``; examples/c_golden/ reads them from C).

Every function here takes NumPy arrays or torch tensors (any device, bf16 included); torch is imported
only by the caller.

Numerics: everything here uses refbitnet's integer form and torch-float32 rounding unless told
otherwise (int8 activations x ternary codes summed exactly in int32, then ``acc / s * weight_scale``
in float32). That is what
bitnet.cpp and integer kernels compute; transformers' AutoBitLinear computes the fake-quant form
(``form="fake-quant"``). The two agree up to float rounding, which can flip an int8 activation
code at the next quantizer; compare an implementation against the numerics it claims.

Stability: the names exported in ``__all__`` keep their signatures; new keyword arguments may be added.
"""

from __future__ import annotations

from ..bitlinear import BitLinearOutput
from ..quant import NUMERICS, Numerics
from .arrays import as_array
from .compare import (Report, TensorCheck, assert_activations_match, compare_activations, compare_int8_codes,
                      compare_tensor, compare_ternary_codes, ulp_distance)
from .layouts import (LAYOUTS, decode, encode, pack_bitnet_gpu, pack_hf, pack_i2s, pack_kernel, pack_tq1_0,
                      pack_tq2_0, unpack_bitnet_gpu, unpack_hf, unpack_i2s, unpack_kernel, unpack_tq1_0,
                      unpack_tq2_0)
from .reference import (INTEGER_PARTS, PROJECTION_INPUTS, TRACE_TENSORS, load_reference_model,
                        quantize_activations, quantize_weights, reference_activations, reference_bitlinear,
                        trace_names)

__all__ = [
    "LAYOUTS", "TRACE_TENSORS", "PROJECTION_INPUTS", "INTEGER_PARTS", "encode", "decode",
    "reference_bitlinear", "BitLinearOutput", "quantize_weights", "quantize_activations", "NUMERICS",
    "Numerics",
    "load_reference_model", "reference_activations", "trace_names", "TensorCheck", "Report", "compare_tensor",
    "compare_int8_codes", "compare_ternary_codes", "ulp_distance", "compare_activations",
    "assert_activations_match", "as_array",
    "pack_hf", "unpack_hf", "pack_kernel", "unpack_kernel", "pack_i2s", "unpack_i2s",
    "pack_tq2_0", "unpack_tq2_0", "pack_tq1_0", "unpack_tq1_0", "pack_bitnet_gpu", "unpack_bitnet_gpu",
]
