"""SimpleTuner's `gradient_checkpointing_interval`: recompute only every N-th block's activations.

diffusers' transformers (SD3, Sana) run each block through `_gradient_checkpointing_func` when
checkpointing is on. Here that function checkpoints blocks 0, N, 2N, … of each forward and runs the others
plainly: less recomputation than checkpointing every block, less memory than none. A forward pre-hook
restarts the count, so the choice depends on a block's place, not on how many forwards ran before.
"""

from __future__ import annotations

from typing import Any


def checkpoint_every(model: Any, interval: int) -> None:
    model.enable_gradient_checkpointing()
    if interval <= 1:
        return
    checkpointed = model._gradient_checkpointing_func
    count = {"block": 0}

    def restart(*_: Any) -> None:
        count["block"] = 0

    def run(block: Any, *args: Any) -> Any:
        index = count["block"]
        count["block"] += 1
        return checkpointed(block, *args) if index % interval == 0 else block(*args)

    model.register_forward_pre_hook(restart)
    model._gradient_checkpointing_func = run
