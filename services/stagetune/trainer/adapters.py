"""What is trained on the transformer, behind one interface: LoRA (peft), LyCORIS (lycoris-lora), or all of it.

Each adapter says which parameters train, writes and reads its checkpoint file, gives validation a file
diffusers can load, exports its final weights the way SimpleTuner users and diffusers expect, and can be
switched off for regularisation data (the base model's own prediction is the target there).

- `LoraAdapter`: `pytorch_lora_weights.safetensors` through the pipeline's `save_lora_weights`, what
  `load_lora_weights` reads (training-facts.md: never through `convert_state_dict_to_diffusers`).
- `LycorisAdapter`: `lycoris_config` (SimpleTuner's JSON: algo, multiplier, linear_dim, linear_alpha,
  factor, apply_preset). Saved as SimpleTuner saves it (`pytorch_lora_weights.safetensors` in LyCORIS' own
  names, with the config in its metadata) and exported as `pytorch_lora_weights.diffusers.safetensors`:
  the same tensors under the transformer's module names, which diffusers' `load_lora_adapter(sd,
  prefix=None)` loads (LoKr, LoHa and LoCon; equal to LyCORIS' own merge within 1e-6).
- `FullAdapter` (`model_type: full`): every transformer weight trains; checkpoints hold the transformer,
  and `output_dir` becomes a diffusers pipeline folder (the trained transformer beside the base model's
  other parts) that `from_pretrained(output_dir)` loads.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from stagetune.core.errors import ConfigError
from stagetune.core.store.base import Store
from stagetune.trainer.lora import LORA_FILE, add_lora, load_lora_bytes, lora_file_bytes

LYCORIS_DIFFUSERS_FILE = "pytorch_lora_weights.diffusers.safetensors"
DIFFUSERS_LYCORIS_ALGOS = ("lokr", "locon", "lora")
FULL_FILE = "transformer/diffusion_pytorch_model.safetensors"


class Adapter(Protocol):
    kind: str
    #: Whether the base model's own prediction is at hand (`disabled()`): the target of regularisation data.
    #: A full-rank model has no base beside it, and such data trains as ordinary data, as in SimpleTuner.
    has_base: bool
    #: Its file in a checkpoint (and the main file it exports).
    file: str

    def attach(self, model: torch.nn.Module) -> list[torch.nn.Parameter]: ...

    def state_bytes(self) -> bytes: ...

    def checkpoint_extras(self) -> dict[str, bytes]:
        """Files a checkpoint holds beside `file` so users' tools read it (a full model's config.json)."""
        ...

    def load_bytes(self, data: bytes) -> None: ...

    def validation_bytes(self) -> bytes:
        """A file the validation service loads onto the base pipeline (a LoRA, a LyCORIS export or a
        transformer state dict)."""
        ...

    def export(self, output: Store, *, folder: str = "") -> list[str]: ...

    def disabled(self) -> contextlib.AbstractContextManager[None]: ...


def make_adapter(cfg: Any, family: Any, pipeline_cls: type) -> Adapter:
    if cfg.model_type == "full":
        return FullAdapter(cfg)
    if cfg.lora_type == "lycoris":
        return LycorisAdapter(cfg, family)
    return LoraAdapter(cfg, family, pipeline_cls)


class LoraAdapter:
    kind = "lora"
    has_base = True
    file = LORA_FILE

    def __init__(self, cfg: Any, family: Any, pipeline_cls: type) -> None:
        self.cfg, self.family, self.pipeline_cls = cfg, family, pipeline_cls
        self.model: torch.nn.Module | None = None

    def attach(self, model: torch.nn.Module) -> list[torch.nn.Parameter]:
        self.model = model
        cfg = self.cfg
        params = add_lora(model, rank=cfg.lora_rank, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout,
                          target_modules=list(self.family.lora_targets), init=cfg.lora_init_type)
        if cfg.init_lora:
            try:
                load_lora_bytes(model, Path(cfg.init_lora).read_bytes())
            except OSError as exc:
                raise ConfigError(f"init_lora: cannot read {cfg.init_lora}: {exc.strerror or exc}",
                                  field="init_lora") from None
            except (RuntimeError, ValueError) as exc:
                raise ConfigError(f"init_lora: {cfg.init_lora} does not fit this model and lora_rank: "
                                  f"{str(exc).splitlines()[0]}", field="init_lora") from None
        return params

    def state_bytes(self) -> bytes:
        assert self.model is not None
        return lora_file_bytes(self.model, self.pipeline_cls)

    def checkpoint_extras(self) -> dict[str, bytes]:
        return {}

    def load_bytes(self, data: bytes) -> None:
        assert self.model is not None
        load_lora_bytes(self.model, data)

    def validation_bytes(self) -> bytes:
        return self.state_bytes()

    def export(self, output: Store, *, folder: str = "") -> list[str]:
        name = f"{folder}/{self.file}" if folder else self.file
        output.put_bytes(name, self.state_bytes())
        return [name]

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        assert self.model is not None
        self.model.disable_adapters()
        try:
            yield
        finally:
            self.model.enable_adapters()


class LycorisAdapter:
    kind = "lycoris"
    has_base = True
    file = LORA_FILE  # SimpleTuner writes LyCORIS weights under the LoRA file name, config in the metadata

    def __init__(self, cfg: Any, family: Any) -> None:
        self.cfg, self.family = cfg, family
        self.settings = dict(cfg.lycoris or {})
        self.network: Any = None
        self.model: torch.nn.Module | None = None

    def attach(self, model: torch.nn.Module) -> list[torch.nn.Parameter]:
        from lycoris import LycorisNetwork, create_lycoris

        self.model = model
        model.requires_grad_(False)
        settings = dict(self.settings)
        preset = settings.pop("apply_preset", None) or {"target_module": list(self.family.lycoris_targets)}
        LycorisNetwork.apply_preset(preset)  # class-level state in lycoris: set before every creation
        algo = settings.pop("algo", "lokr")
        multiplier = float(settings.pop("multiplier", 1.0))
        dim = int(settings.pop("linear_dim", self.cfg.lora_rank))
        alpha = float(settings.pop("linear_alpha", self.cfg.lora_alpha or dim))
        try:
            self.network = create_lycoris(model, multiplier, linear_dim=dim, linear_alpha=alpha, algo=algo,
                                          **settings)
        except (TypeError, ValueError, KeyError) as exc:
            raise ConfigError(f"lycoris_config: LyCORIS refused {self.settings}: {exc}", field="lycoris_config"
                              ) from None
        self.network.apply_to()
        self.network.to(next(model.parameters()).device)
        params = [p for p in self.network.parameters() if p.requires_grad]
        for param in params:
            param.data = param.data.float()
        return params

    def _lycoris_file(self) -> Path:
        return Path(tempfile.mkdtemp(prefix="stagetune-lycoris-")) / LORA_FILE

    def state_bytes(self) -> bytes:
        path = self._lycoris_file()
        try:
            self.network.save_weights(str(path), torch.float32, {"lycoris_config": json.dumps(self.settings)})
            return path.read_bytes()
        finally:
            shutil.rmtree(path.parent, ignore_errors=True)

    def checkpoint_extras(self) -> dict[str, bytes]:
        return {}

    def load_bytes(self, data: bytes) -> None:
        path = self._lycoris_file()
        try:
            path.write_bytes(data)
            missing = self.network.load_weights(str(path))
        finally:
            shutil.rmtree(path.parent, ignore_errors=True)
        if missing:
            raise ValueError(f"LyCORIS weights do not fit this network: {str(missing)[:200]}")

    @property
    def diffusers_loads(self) -> bool:
        """diffusers 0.42's load_lora_adapter reads LoKr and LoCon/LoRA exports; LoHa's it cannot (yet)."""
        return self.settings.get("algo", "lokr") in DIFFUSERS_LYCORIS_ALGOS

    def diffusers_bytes(self) -> bytes:
        """LyCORIS' tensors under the transformer's module names, LoCon's up/down as LoRA's B/A: what
        diffusers' load_lora_adapter(sd, prefix=None) reads."""
        assert self.model is not None
        names = {name.replace(".", "_"): name for name, _ in self.model.named_modules()}
        tensors = load_safetensors(self.state_bytes())
        out = {}
        for key, tensor in tensors.items():
            module, _, leaf = key.partition(".")
            real = names.get(module.removeprefix("lycoris_"))
            if real is None:
                raise ValueError(f"LyCORIS tensor {key} names no module of the transformer")
            if leaf == "alpha" and f"{module}.lora_down.weight" in tensors:
                continue  # LoCon: its alpha/rank scale is folded into lora_B below (peft would ignore it)
            if leaf.startswith("lora_up."):
                rank = tensors[f"{module}.lora_down.weight"].shape[0]
                alpha = float(tensors[f"{module}.alpha"]) if f"{module}.alpha" in tensors else rank
                tensor = tensor * (alpha / rank)
            leaf = leaf.replace("lora_down.", "lora_A.").replace("lora_up.", "lora_B.")
            out[f"{real}.{leaf}"] = tensor.contiguous()
        return save_safetensors(out, metadata={"format": "pt", "stagetune_adapter": "lycoris"})

    def validation_bytes(self) -> bytes:
        """The diffusers export, or (LoHa) the transformer's weights with each module's difference added."""
        if self.diffusers_loads:
            return self.diffusers_bytes()
        assert self.model is not None
        names = {id(module): name for name, module in self.model.named_modules()}
        state = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items() if "lycoris" not in k}
        with torch.no_grad():
            for module in self.network.loras:
                original = module.org_module[0]
                diff, _ = module.get_diff_weight(multiplier=module.multiplier, shape=original.weight.shape)
                key = f"{names[id(original)]}.weight"
                state[key] = state[key] + diff.detach().cpu().to(state[key].dtype)
        return save_safetensors({k: v.contiguous() for k, v in state.items()}, metadata={"format": "pt"})

    def export(self, output: Store, *, folder: str = "") -> list[str]:
        prefix = f"{folder}/" if folder else ""
        output.put_bytes(prefix + self.file, self.state_bytes())
        written = [prefix + self.file]
        if self.diffusers_loads:
            output.put_bytes(prefix + LYCORIS_DIFFUSERS_FILE, self.diffusers_bytes())
            written.append(prefix + LYCORIS_DIFFUSERS_FILE)
        return written

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        multiplier = self.network.multiplier
        self.network.set_multiplier(0.0)
        try:
            yield
        finally:
            self.network.set_multiplier(multiplier)


class FullAdapter:
    kind = "full"
    has_base = False
    file = FULL_FILE

    def __init__(self, cfg: Any) -> None:
        self.cfg = cfg
        self.model: torch.nn.Module | None = None
        #: Set when FSDP shards the model over these ranks (trainer/distributed.py): saving then gathers the
        #: whole weights on rank 0, a collective every rank calls; the files stay whole and loadable anywhere.
        self.sharded_over: Any = None

    def attach(self, model: torch.nn.Module) -> list[torch.nn.Parameter]:
        self.model = model
        model.requires_grad_(True)
        return [p for p in model.parameters() if p.requires_grad]

    def _whole_state(self) -> dict[str, torch.Tensor]:
        """The whole weights (on rank 0; empty on the other ranks of a sharded model)."""
        assert self.model is not None
        if self.sharded_over is not None:
            from stagetune.trainer.distributed import whole_model_state

            return whole_model_state(self.model)
        return {k: v.detach().cpu() for k, v in self.model.state_dict().items()}

    def state_bytes(self) -> bytes:
        state = self._whole_state()
        return save_safetensors({k: v.contiguous() for k, v in state.items()}, metadata={"format": "pt"})

    def checkpoint_extras(self) -> dict[str, bytes]:
        """checkpoint-N/transformer/ is a model folder: `from_pretrained(checkpoint-N, subfolder="transformer")`."""
        assert self.model is not None
        return {"transformer/config.json": self.model.to_json_string().encode()}

    def load_bytes(self, data: bytes) -> None:
        assert self.model is not None
        if self.sharded_over is not None:  # every rank reads the same whole file and keeps its shards
            from stagetune.trainer.distributed import load_whole_model_state

            load_whole_model_state(self.model, load_safetensors(data))
            return
        self.model.load_state_dict(load_safetensors(data), strict=True)

    def validation_bytes(self) -> bytes:
        return self.state_bytes()

    def export(self, output: Store, *, folder: str = "") -> list[str]:
        """A diffusers pipeline folder: the trained transformer, and the base model's other parts as they are.
        Sharded, every rank gathers and rank 0 writes."""
        assert self.model is not None
        prefix = f"{folder}/" if folder else ""
        written = []
        with tempfile.TemporaryDirectory(prefix="stagetune-full-") as tmp:
            if self.sharded_over is not None:
                weights = self.state_bytes()
                if not self.sharded_over.is_main:
                    return []
                (Path(tmp) / "transformer").mkdir()
                (Path(tmp) / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(weights)
                (Path(tmp) / "transformer" / "config.json").write_text(self.model.to_json_string())
            else:
                self.model.save_pretrained(Path(tmp) / "transformer", safe_serialization=True)
            for path in sorted((Path(tmp) / "transformer").iterdir()):
                output.put_file(f"{prefix}transformer/{path.name}", path)
                written.append(f"{prefix}transformer/{path.name}")
        base = Path(self.cfg.pretrained_model_name_or_path).expanduser()
        if base.is_dir():  # a hub id: the user's tools fetch the other parts from the hub themselves
            for path in sorted(base.rglob("*")):
                relative = path.relative_to(base).as_posix()
                if path.is_file() and not relative.startswith("transformer/"):
                    output.put_file(prefix + relative, path)
        return written

    @contextlib.contextmanager
    def disabled(self) -> Iterator[None]:
        """Never asked for (`has_base` is False): there is no base model beside the trained one."""
        raise ConfigError("model_type full has no base prediction to switch to", field="model_type")
        yield  # pragma: no cover
