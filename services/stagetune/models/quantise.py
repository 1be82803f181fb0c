"""Quantised frozen bases, as SimpleTuner's `base_model_precision` / `text_encoder_N_precision` make them.

optimum-quanto quantises the frozen weights in place (`int8-quanto`, `int4-quanto`, `int2-quanto`,
`fp8-quanto`); the adapter on top trains in its own precision and, since it never touches the quantised
weights, loads into the plain model afterwards. As SimpleTuner does, the model is first cast to
`base_model_default_dtype` (bf16 by default: quanto's CPU kernels refuse a float32 base under bf16
autocast), and the family's exclude list stays in full precision. `nf4-bnb` is bitsandbytes' 4-bit, which
needs a CUDA GPU. int4 and int2 (and fp8 on a CUDA GPU) need quanto's C++/CUDA/HIP extension: our images
carry it prebuilt (quanto_kernels.py), elsewhere quanto compiles it on first use. Where neither can happen,
that is said before any work, naming the key.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from typing import Any

from stagetune.core.errors import NotSupportedError, PreconditionError

#: SimpleTuner's precision name → optimum-quanto's weight type.
QUANTO = {"int8-quanto": "qint8", "int4-quanto": "qint4", "int2-quanto": "qint2", "fp8-quanto": "qfloat8"}
BNB = {"nf4-bnb"}
SUPPORTED = ("no_change", *QUANTO, *BNB)
NEEDS_COMPILER = {"int4-quanto", "int2-quanto"}


def check_precision(precision: str, key: str, *, cuda: bool | None = None) -> None:
    """Refuse, before any work, a precision this machine cannot run."""
    if precision in ("no_change", "", None):
        return
    if precision not in SUPPORTED:
        raise NotSupportedError(f"not supported yet: {key}={precision} (stagetune supports "
                                f"{', '.join(SUPPORTED)})", field=key)
    if precision in BNB:
        if cuda is None:
            import torch

            cuda = torch.cuda.is_available()
        if not cuda:
            raise PreconditionError(f"{key}={precision} needs a CUDA GPU (bitsandbytes' 4-bit kernels); "
                                    "use int8-quanto or int4-quanto here", field=key)
    if precision in NEEDS_COMPILER and not (shutil.which("c++") or shutil.which("g++")) and not _any_prebuilt():
        raise PreconditionError(f"{key}={precision} compiles optimum-quanto's int4/int2 kernels on first use and "
                                "no C++ compiler (g++) is installed: install one, or use int8-quanto", field=key)


def _any_prebuilt() -> bool:
    """Cheap (no torch): prebuilt kernels are present. Whether they suit this machine's GPU is checked where
    the model is quantised (`quantise`)."""
    from stagetune.models.quanto_kernels import built_libraries, kernels_root

    root = kernels_root()
    return root is not None and bool(built_libraries(root))


def _kernels_for(precision: str, key: str) -> None:
    """Give quanto its prebuilt kernels, and refuse now where it needs them and could neither use nor build
    them: int4/int2 always (packing), fp8 on a CUDA GPU (quanto's Marlin fp8 matmul)."""
    import torch

    from stagetune.models import quanto_kernels

    quanto_kernels.use_prebuilt()
    needed = precision in NEEDS_COMPILER or (precision == "fp8-quanto" and bool(torch.version.cuda)
                                             and torch.cuda.is_available())
    problem = quanto_kernels.compile_problem() if needed else None
    if problem:
        raise PreconditionError(f"{key}={precision} needs optimum-quanto's compiled kernels: {problem}. Use an "
                                f"image with them prebuilt ({quanto_kernels.ENV_DIR}), or int8-quanto", field=key)


def quantise(model: Any, precision: str, *, exclude: Sequence[str], key: str = "base_model_precision") -> Any:
    """Quantise `model`'s frozen weights in place (a no-op for no_change); returns the model."""
    if precision in ("no_change", "", None):
        return model
    check_precision(precision, key)
    if precision in BNB:
        return _quantise_bnb(model, exclude)
    _kernels_for(precision, key)
    from optimum import quanto

    quanto.quantize(model, weights=getattr(quanto, QUANTO[precision]), exclude=list(exclude))
    quanto.freeze(model)
    return model


def _quantise_bnb(model: Any, exclude: Sequence[str]) -> Any:  # pragma: no cover - needs CUDA
    import fnmatch

    import bitsandbytes as bnb
    import torch

    for name, module in list(model.named_modules()):
        if not isinstance(module, torch.nn.Linear) or any(fnmatch.fnmatch(name, p) for p in exclude):
            continue
        parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        layer = bnb.nn.Linear4bit(module.in_features, module.out_features, bias=module.bias is not None,
                                  compute_dtype=torch.bfloat16, quant_type="nf4")
        layer.weight = bnb.nn.Params4bit(module.weight.data, requires_grad=False, quant_type="nf4")
        if module.bias is not None:
            layer.bias = module.bias
        setattr(parent, name.rpartition(".")[2], layer.cuda())
    return model
