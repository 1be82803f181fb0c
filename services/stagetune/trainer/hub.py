"""push_to_hub: the finished run's weights, a model card and the last validation images, published to a
Hugging Face Hub model repository as SimpleTuner publishes them (huggingface_hub's commit API).

The repository is `hub_model_id`, or `tracker_project_name` when that is unset (SimpleTuner's rule). It is
created (or found) before training starts, so a missing token or an unreachable Hub is said in the first
seconds, not after hours. Publishing happens after the weights are written: when it fails the weights stay
in output_dir and running the same command again pushes them without training (`.stagetune/hub.json`
records what was pushed). `push_checkpoints_to_hub` also uploads each checkpoint folder when it is saved.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from typing import Any

from stagetune.core.errors import PreconditionError, UnauthenticatedError, UnavailableError
from stagetune.core.run_settings import HUB_RECORD_KEY, read_output_state
from stagetune.core.store.base import Store

#: Output folders that are not part of the published model.
NOT_PUBLISHED = ("checkpoint-", ".stagetune/", "validation_images/")


class HubPublisher:
    def __init__(self, cfg: Any, output: Store, *, family: str) -> None:
        from huggingface_hub import HfApi

        # HF_ENDPOINT read now, not when huggingface_hub was first imported: a long-lived service follows it
        self.cfg = cfg
        self.output = output
        self.family = family
        self.repo_id = cfg.hub_repo_id()
        self.api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None)
        self.url = ""

    def prepare(self) -> None:
        """Create the repository, or find it: the token and the Hub are checked before any training."""
        with self._errors("create the repository"):
            self.url = str(self.api.create_repo(self.repo_id, private=self.cfg.model_card_private, exist_ok=True))

    def pushed_step(self) -> int | None:
        return read_output_state(self.output).pushed_step(self.repo_id)

    def push_final(self, step: int) -> str:
        """Publish the run's outputs at `step`; returns the commit URL."""
        from huggingface_hub import CommitOperationAdd

        keys = [key for key in self.output.list("") if _published(key, step, self.cfg.logging_dir)]
        operations = [CommitOperationAdd(_repo_path(key, step), self._source(key)) for key in keys]
        images = [_repo_path(key, step) for key in keys if key.startswith("validation_images/")]
        card = model_card(self.cfg, self.family, step, images)
        operations.append(CommitOperationAdd("README.md", card.encode()))
        with self._errors("push the weights", kept=True):
            commit = self.api.create_commit(self.repo_id, operations, commit_message=f"stagetune: step {step}")
        self.output.put_bytes(HUB_RECORD_KEY, json.dumps({"repo_id": self.repo_id, "step": step,
                                                  "commit": str(commit.commit_url)}, indent=1).encode())
        return str(commit.commit_url)

    def push_checkpoint(self, name: str) -> None:
        """Upload `checkpoint-N/` under the same name in the repository (push_checkpoints_to_hub)."""
        from huggingface_hub import CommitOperationAdd

        operations = [CommitOperationAdd(key, self._source(key)) for key in self.output.list(f"{name}/")]
        with self._errors(f"push {name}", kept=True):
            self.api.create_commit(self.repo_id, operations, commit_message=f"stagetune: {name}")

    def _source(self, key: str) -> Any:
        local = self.output.local_path(key)
        return str(local) if local is not None else self.output.get_bytes(key)

    @contextlib.contextmanager
    def _errors(self, action: str, *, kept: bool = False) -> Iterator[None]:
        """The Hub's failures as the three things a user can act on: offline, refused token, unreachable."""
        from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

        where = f"push_to_hub: could not {action} {self.repo_id} on {self.api.endpoint}"
        after = (f"; the weights are kept in {self.output.url}: run the same command again to push them"
                 if kept else "")
        try:
            yield
        except OfflineModeIsEnabled:
            raise PreconditionError(f"{where}: HF_HUB_OFFLINE is set{after}", field="push_to_hub") from None
        except HfHubHTTPError as exc:
            status = exc.response.status_code if exc.response is not None else None
            if status in (401, 403):
                raise UnauthenticatedError(f"{where}: the Hub refused the token (HTTP {status}); log in with "
                                           f"`hf auth login` or set HF_TOKEN{after}", field="push_to_hub") from None
            raise UnavailableError(f"{where}: HTTP {status}: {str(exc).splitlines()[0]}{after}",
                                   field="push_to_hub") from None
        except Exception as exc:
            if not _unreachable(exc):
                raise
            raise UnavailableError(f"{where}: cannot reach the Hub ({exc}){after}", field="push_to_hub") from None


def _unreachable(exc: BaseException) -> bool:
    """A connection that failed: OSError, or the HTTP client's transport errors (huggingface_hub has used
    requests, httpx and httpx2 over its versions, so they are recognised by name, not imported)."""
    names = {cls.__name__ for cls in type(exc).__mro__}
    return isinstance(exc, OSError) or bool(names & {"TransportError", "ConnectionError", "TimeoutException"})


def _published(key: str, step: int, logging_dir: str) -> bool:
    if key.startswith(f"validation_images/step_{step}_") and key.endswith(".png"):
        return True  # the last validation images, for the model card
    return not key.startswith((*NOT_PUBLISHED, logging_dir.rstrip("/") + "/"))


def _repo_path(key: str, step: int) -> str:
    return f"images/{key.removeprefix('validation_images/')}" if key.startswith("validation_images/") else key


def model_card(cfg: Any, family: str, step: int, images: list[str]) -> str:
    """README.md: metadata the Hub indexes (base model, tags) and how to load what was trained."""
    from huggingface_hub import ModelCardData

    adapter = "full" if cfg.model_type == "full" else ("lycoris" if cfg.lora_type == "lycoris" else "lora")
    tags = ["text-to-image", "diffusers", "stagetune", family, adapter]
    if not cfg.model_card_safe_for_work:
        tags.append("not-for-all-audiences")  # as SimpleTuner tags a card not marked safe for work
    data = ModelCardData(base_model=cfg.pretrained_model_name_or_path, library_name="diffusers",
                         pipeline_tag="text-to-image", tags=tags)
    shape = (f"LoRA, rank {cfg.lora_rank}, alpha {cfg.lora_alpha or cfg.lora_rank}" if adapter == "lora"
             else "LyCORIS adapter" if adapter == "lycoris" else "full-rank fine-tune")
    lines = [
        f"---\n{data.to_yaml()}\n---",
        f"# {cfg.hub_repo_id()}",
        f"A {shape} of `{cfg.pretrained_model_name_or_path}`, trained with stagetune for {step} steps.",
        "",
        "| setting | value |",
        "| --- | --- |",
        f"| optimizer | {cfg.optimizer} |",
        f"| learning rate | {cfg.learning_rate} ({cfg.lr_scheduler}) |",
        f"| batch size | {cfg.train_batch_size} × {cfg.gradient_accumulation_steps} accumulation |",
        f"| base precision | {cfg.base_model_precision} |",
        f"| seed | {cfg.seed} |",
    ]
    if cfg.validation_prompt:
        lines += ["", f"Validation prompt: `{cfg.validation_prompt}`"]
    lines += [f"![{path}]({path})" for path in images]
    if adapter == "lora":
        lines += ["", "```python", "import torch", "from diffusers import DiffusionPipeline", "",
                  f"pipe = DiffusionPipeline.from_pretrained({cfg.pretrained_model_name_or_path!r})",
                  f"pipe.load_lora_weights({cfg.hub_repo_id()!r})", "```"]
    elif adapter == "full":
        lines += ["", "```python", "from diffusers import DiffusionPipeline", "",
                  f"pipe = DiffusionPipeline.from_pretrained({cfg.hub_repo_id()!r})", "```"]
    if cfg.model_card_note:
        lines += ["", cfg.model_card_note]
    return "\n".join(lines) + "\n"
