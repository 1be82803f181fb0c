"""SimpleTuner's optimizers by their names, with its default settings and its `optimizer_config` rules.

Each name maps to a class in torch, torch-optimi, bitsandbytes or prodigy-plus-schedule-free (or our
`adamw_bf16`) and SimpleTuner's default settings for it. A user's settings win in SimpleTuner's order:
`optimizer_config` ("eps=1e-6,weight_decay=0.0") if given, else `optimizer_beta1` + `optimizer_beta2` as
betas. stagetune also honours `adam_beta1/2`, `adam_epsilon` and `adam_weight_decay` when the config
sets them (SimpleTuner passes those to DeepSpeed only): a user who sets them gets what they name.

Settings an optimizer's constructor does not take are dropped with a warning, as SimpleTuner does.
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from stagetune.core.config.optimizer_names import parse_optimizer_config
from stagetune.core.errors import ConfigError, PreconditionError


@dataclasses.dataclass(frozen=True)
class OptimizerSpec:
    target: str  # "module:Class"
    defaults: Mapping[str, Any]
    bf16_weights: bool = False  # trains bfloat16 weights only (adamw_bf16)
    schedule_free: bool = False  # train()/eval() around validation and saving (prodigy)
    package: str = ""  # the pip package, named when it is missing


def _torch(cls: str, **defaults: Any) -> OptimizerSpec:
    return OptimizerSpec(f"torch.optim:{cls}", defaults)


def _optimi(cls: str, **defaults: Any) -> OptimizerSpec:
    return OptimizerSpec(f"optimi:{cls}", {"decouple_lr": False, "kahan_sum": True, **defaults}, package="torch-optimi")


def _bnb(cls: str, **defaults: Any) -> OptimizerSpec:
    return OptimizerSpec(f"bitsandbytes.optim:{cls}", defaults, package="bitsandbytes")


_ADAM = {"betas": (0.9, 0.999), "eps": 1e-8}
_BNB_ADAMW = {"betas": (0.9, 0.999), "weight_decay": 1e-2, "eps": 1e-6}
_BNB_LION = {"betas": (0.9, 0.99), "weight_decay": 0.0, "min_8bit_size": 4096}
_BNB_ADAM = {"betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0, "amsgrad": False, "min_8bit_size": 4096,
             "percentile_clipping": 100}
_BNB_ADAGRAD = {"lr_decay": 0, "weight_decay": 0, "initial_accumulator_value": 0, "eps": 1e-10,
                "min_8bit_size": 4096, "percentile_clipping": 100}

#: SimpleTuner's optimizer names (helpers/training/optimizer_param.py) with its default settings.
OPTIMIZERS: dict[str, OptimizerSpec] = {
    "torch-adam": _torch("Adam", **_ADAM, weight_decay=0.0, amsgrad=False),
    "torch-adamw": _torch("AdamW", **_ADAM, weight_decay=1e-2, amsgrad=False),
    "torch-sgd": _torch("SGD", momentum=0.0, weight_decay=0.0, dampening=0.0, nesterov=False),
    "torch-radam": _torch("RAdam", **_ADAM, weight_decay=0.0),
    "torch-nadam": _torch("NAdam", **_ADAM, weight_decay=0.0, momentum_decay=4e-3),
    "torch-rmsprop": _torch("RMSprop", alpha=0.99, weight_decay=0.0, eps=1e-8, momentum=0.0),
    "torch-adagrad": _torch("Adagrad", lr_decay=0.0, weight_decay=0.0, eps=1e-10),
    "torch-adadelta": _torch("Adadelta", rho=0.9, weight_decay=0.0, eps=1e-6),
    "torch-adafactor": _torch("Adafactor", beta2_decay=-0.8, eps=(None, 1e-3), d=1.0, weight_decay=0.0),
    "torch-adamax": _torch("Adamax", **_ADAM, weight_decay=0.0),
    "torch-asgd": _torch("ASGD", lambd=1e-4, alpha=0.75, t0=1e6, weight_decay=0.0),
    "adamw_bf16": OptimizerSpec("stagetune.trainer.adamw_bf16:AdamWBF16",
                                {"betas": (0.9, 0.999), "weight_decay": 1e-2, "eps": 1e-6}, bf16_weights=True),
    "optimi-stableadamw": _optimi("StableAdamW", betas=(0.9, 0.99), weight_decay=1e-2, eps=1e-6, max_lr=None),
    "optimi-adamw": _optimi("AdamW", betas=(0.9, 0.99), eps=1e-6, weight_decay=0.0, max_lr=None),
    "optimi-lion": _optimi("Lion", betas=(0.9, 0.99), weight_decay=0.0, max_lr=None),
    "optimi-radam": _optimi("RAdam", betas=(0.9, 0.99), weight_decay=0.0, eps=1e-6, decouple_wd=True),
    "optimi-ranger": _optimi("Ranger", betas=(0.9, 0.99), weight_decay=0.0, eps=1e-6, k=6, alpha=0.5,
                             decouple_wd=True, max_lr=None),
    "optimi-adan": _optimi("Adan", betas=(0.98, 0.92, 0.999), weight_decay=2e-2, eps=1e-6, max_lr=None,
                           adam_wd=False),
    "optimi-adam": _optimi("Adam", betas=(0.9, 0.99), eps=1e-6, weight_decay=0.0, decouple_wd=False, max_lr=None),
    "optimi-sgd": _optimi("SGD", momentum=0, weight_decay=0.0, dampening=False, decouple_wd=False, max_lr=None,
                          torch_init=False),
    "bnb-adagrad": _bnb("Adagrad", **_BNB_ADAGRAD),
    "bnb-adagrad8bit": _bnb("Adagrad8bit", **_BNB_ADAGRAD),
    "bnb-adam": _bnb("Adam", **_BNB_ADAM),
    "bnb-adam8bit": _bnb("Adam8bit", **_BNB_ADAM),
    "bnb-adamw": _bnb("AdamW", **_BNB_ADAMW),
    "bnb-adamw8bit": _bnb("AdamW8bit", **_BNB_ADAMW),
    "bnb-adamw-paged": _bnb("PagedAdamW", **_BNB_ADAMW),
    "bnb-adamw8bit-paged": _bnb("PagedAdamW8bit", **_BNB_ADAMW),
    "bnb-lion": _bnb("Lion", **_BNB_LION),
    "bnb-lion8bit": _bnb("Lion8bit", **_BNB_LION),
    "bnb-lion-paged": _bnb("PagedLion", **_BNB_LION),
    "bnb-lion8bit-paged": _bnb("PagedLion8bit", **_BNB_LION),
    "prodigy": OptimizerSpec(
        "prodigyplus.prodigy_plus_schedulefree:ProdigyPlusScheduleFree",
        {"betas": (0.9, 0.99), "beta3": None, "weight_decay": 0.0, "weight_decay_by_lr": True,
         "use_bias_correction": False, "d0": 1e-6, "d_coef": 1, "prodigy_steps": 0, "use_speed": False, "eps": 1e-8,
         "split_groups": True, "split_groups_mean": True, "factored": True, "factored_fp32": True,
         "fused_back_pass": False, "use_stableadamw": True, "use_muon_pp": False, "use_cautious": False,
         "use_grams": False, "use_adopt": False, "stochastic_rounding": True},
        schedule_free=True, package="prodigy-plus-schedule-free"),
}
def settings_for(name: str, cfg: Any) -> dict[str, Any]:
    """The constructor settings for optimizer `name` under `cfg` (before dropping what it does not take)."""
    spec = OPTIMIZERS[name]
    settings = dict(spec.defaults)
    explicit = getattr(cfg, "explicit_keys", frozenset())
    legacy = {"adam_beta1": None, "adam_beta2": None, "adam_epsilon": "eps", "adam_weight_decay": "weight_decay"}
    if "betas" in settings and ({"adam_beta1", "adam_beta2"} & explicit):
        betas = list(settings["betas"])
        betas[0], betas[1] = cfg.adam_beta1, cfg.adam_beta2
        settings["betas"] = tuple(betas)
    for key, target in legacy.items():
        if target and key in explicit:
            settings[target] = getattr(cfg, key)
    if cfg.optimizer_config:
        settings.update(parse_optimizer_config(cfg.optimizer_config))
    elif cfg.optimizer_beta1 is not None and cfg.optimizer_beta2 is not None:
        settings["betas"] = (cfg.optimizer_beta1, cfg.optimizer_beta2)
    if name == "prodigy" and cfg.prodigy_steps:
        settings["prodigy_steps"] = int(cfg.prodigy_steps)
    settings.pop("lr", None)  # learning_rate is the config's, for every optimizer
    return settings


def optimizer_class(name: str) -> type:
    spec = OPTIMIZERS[name]
    module, _, attr = spec.target.partition(":")
    try:
        return getattr(importlib.import_module(module), attr)
    except ImportError as exc:
        raise PreconditionError(f"optimizer={name} needs the {spec.package or module} package: pip install "
                                f"{spec.package or module} ({exc})", field="optimizer") from None


def build_optimizer(name: str, params: Iterable[torch.nn.Parameter], cfg: Any,
                    warn: Callable[[str], None] = lambda message: None) -> torch.optim.Optimizer:
    cls = optimizer_class(name)
    settings = settings_for(name, cfg)
    accepted = _accepted(cls)
    dropped = sorted(k for k in settings if accepted is not None and k not in accepted)
    if dropped:
        warn(f"optimizer={name} does not take {', '.join(dropped)}: dropped, as SimpleTuner does")
    settings = {k: v for k, v in settings.items() if k not in dropped}
    try:
        return cls(list(params), lr=cfg.learning_rate, **settings)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"optimizer={name} refused its settings {settings}: {exc}",
                          field="optimizer_config" if cfg.optimizer_config else "optimizer") from None


def _accepted(cls: type) -> set[str] | None:
    try:
        signature = inspect.signature(cls.__init__)
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in signature.parameters.values()):
        return None
    return {name for name in signature.parameters if name not in ("self", "params")}
