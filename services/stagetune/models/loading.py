"""One lock around every `from_pretrained` in the process.

diffusers and transformers build models inside accelerate's `init_empty_weights`, which patches
`nn.Module` parameter registration for the whole process, not the calling thread. In the embedded
mode the vae and text services load at the same time on two threads, and a model built by one
thread while the other is inside that context gets meta tensors ("Cannot copy out of meta tensor").
Loading is I/O and allocation; serialising it costs little, and encoding still overlaps.
"""

from __future__ import annotations

import threading

MODEL_LOAD_LOCK = threading.RLock()
