"""Inference-only linear layers through oneDNN on CPU: a cheaper forward per token for scoring.

PyTorch runs a float32 ``F.linear`` on CPU through MKL's sgemm. oneDNN (also inside every x86
torch build, used by ``torch.compile`` for frozen CPU graphs) runs the same product about 10 %
faster per forwarded token on SmolLM2-135M here (2 AMD EPYC cores, AVX2; a profiled 100-question
MMLU pass: 22.3 s of ``aten::mm`` against 20.1 s of ``mkldnn::_linear_pointwise``), and 20-35 %
faster in isolated GEMMs of the model's shapes. On 2 AMD EPYC cores with AVX-512 the gap is far
wider: 211-216 GF/s on MKL against 474-484 GF/s on oneDNN for the same shapes at 2048 rows
(2026-12-01), consistent with MKL running its AVX2 code on AMD CPUs. Results differ only by float
rounding (relative 1e-6 per product; MMLU log-likelihoods within 6e-5).

``onednn_linear(model)`` is a context manager: inside it, a ``TorchFunctionMode`` hands each
``F.linear`` call that oneDNN can take unchanged (float32 CPU tensors, no autograd, plain strided
tensors) to ``torch.ops.mkldnn._linear_pointwise``; every other call runs as before. Nothing on
the model is modified and nothing outlives the block. The op is internal to PyTorch, so before the
first use a probe compares it with ``F.linear`` on a small product; if the op is missing, raises,
or disagrees, the context does nothing (the scores are then computed by MKL, as without it).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

logger = logging.getLogger(__name__)

_PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)
_probe_result: bool | None = None  # None: not probed yet in this process


def _op():
    return torch.ops.mkldnn._linear_pointwise


def onednn_available() -> bool:
    """Whether this torch build has a working oneDNN linear (probed once per process)."""
    global _probe_result
    if _probe_result is None:
        _probe_result = _probe()
    return _probe_result


def _probe() -> bool:
    if not torch.backends.mkldnn.is_available():
        return False
    try:
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(3, 5, 24, generator=generator)
        weight = torch.randn(40, 24, generator=generator)
        bias = torch.randn(40, generator=generator)
        with torch.no_grad():
            expected = F.linear(x, weight, bias)
            got = _op()(x, weight, bias, "none", [], "")
            expected_plain = F.linear(x[:, 1], weight)
            got_plain = _op()(x[:, 1], weight, None, "none", [], "")  # non-contiguous input, no bias
    except (AttributeError, RuntimeError, TypeError, NotImplementedError) as error:
        logger.debug("oneDNN linear unavailable: %s", error)
        return False
    return (
        got.shape == expected.shape
        and got_plain.shape == expected_plain.shape
        and torch.allclose(got, expected, rtol=1e-4, atol=1e-4)
        and torch.allclose(got_plain, expected_plain, rtol=1e-4, atol=1e-4)
    )


def _takes(x, weight, bias) -> bool:
    """oneDNN gets the call only where its result is the same product: fp32, CPU, no autograd."""
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return False
    tensors = (x, weight) if bias is None else (x, weight, bias)
    return (
        all(type(t) in _PLAIN_TENSORS for t in tensors)
        and all(t.dtype == torch.float32 and t.device.type == "cpu" for t in tensors)
        and all(t.layout == torch.strided for t in tensors)
        and weight.dim() == 2
        and x.dim() >= 2
        and (bias is None or bias.dim() == 1)
    )


class _OneDNNLinearMode(TorchFunctionMode):
    """Routes eligible ``F.linear`` calls to oneDNN (see the module docstring)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = _op()
        self.calls = 0  # products that oneDNN ran (for tests and benchmarks)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.linear:
            x = args[0] if args else kwargs.get("input")
            weight = args[1] if len(args) > 1 else kwargs.get("weight")
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            if x is not None and weight is not None and _takes(x, weight, bias):
                self.calls += 1
                return self.linear(x, weight, bias, "none", [], "")
        return func(*args, **kwargs)


def linear_backend(mode: _OneDNNLinearMode | None) -> str:
    """What ran the block's Linears, for an evaluation's settings: ``onednn`` if any call went there."""
    return "onednn" if mode is not None and mode.calls else "default"


@contextlib.contextmanager
def onednn_linear(model: torch.nn.Module | None = None, enabled: bool = True) -> Iterator[object | None]:
    """Run the block's CPU float32 inference linears on oneDNN; yields the mode (or None if off).

    Off when ``enabled`` is false, when the model has parameters off the CPU (nothing would be
    eligible), or when the probe fails.
    """
    on_cpu = model is None or all(p.device.type == "cpu" for p in model.parameters())
    if not (enabled and on_cpu and onednn_available()):
        yield None
        return
    mode = _OneDNNLinearMode()
    with mode:
        yield mode
