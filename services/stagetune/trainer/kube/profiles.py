"""The GPU profiles a stage or a training Job can be pinned to.

The Helm chart carries the same table in `charts/stagetune/values.yaml` (`gpuProfiles`); a test
compares the two, so a label fixed in one place cannot drift from the other. Labels are the ones
NVIDIA GPU Feature Discovery and AMD's node labeller set (see ops-facts.md): a product pin per NVIDIA
profile, the PCI device id for MI300X (its product-name label differs between labeller versions).
"""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class GpuProfile:
    name: str
    resource: str | None  # the extended resource to request; None: a CPU-only pod
    image: str  # image variant: "cuda" or "rocm"
    arch: str  # kubernetes.io/arch of the nodes that carry this GPU
    match_expressions: tuple[dict[str, Any], ...]  # node affinity, ANDed with the arch
    tolerations: tuple[dict[str, Any], ...]

    def node_expressions(self) -> list[dict[str, Any]]:
        """Required node-affinity expressions: the profile's labels plus the architecture."""
        return [*(dict(e, values=list(e["values"])) for e in self.match_expressions),
                {"key": "kubernetes.io/arch", "operator": "In", "values": [self.arch]}]

    def as_values(self) -> dict[str, Any]:
        """The profile as the chart's values.yaml writes it (used by the drift test)."""
        return {"resource": self.resource or "", "image": self.image, "arch": self.arch,
                "matchExpressions": [dict(e, values=list(e["values"])) for e in self.match_expressions],
                "tolerations": [dict(t) for t in self.tolerations]}


def _product(*names: str) -> tuple[dict[str, Any], ...]:
    return ({"key": "nvidia.com/gpu.product", "operator": "In", "values": list(names)},)


_NVIDIA = ({"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"},)
_AMD = ({"key": "amd.com/gpu", "operator": "Exists", "effect": "NoSchedule"},)
# GB200 nodes are often tainted so that amd64-only images never land on them.
_ARM64 = ({"key": "kubernetes.io/arch", "operator": "Equal", "value": "arm64", "effect": "NoSchedule"},)

PROFILES: dict[str, GpuProfile] = {
    p.name: p
    for p in (
        GpuProfile("h100", "nvidia.com/gpu", "cuda", "amd64",
                   _product("NVIDIA-H100-80GB-HBM3", "NVIDIA-H100-PCIe", "NVIDIA-H100-NVL"), _NVIDIA),
        GpuProfile("h200", "nvidia.com/gpu", "cuda", "amd64", _product("NVIDIA-H200", "NVIDIA-H200-NVL"), _NVIDIA),
        GpuProfile("b200", "nvidia.com/gpu", "cuda", "amd64", _product("NVIDIA-B200"), _NVIDIA),
        GpuProfile("gb200", "nvidia.com/gpu", "cuda", "arm64", _product("NVIDIA-GB200"), _NVIDIA + _ARM64),
        GpuProfile("mi300x", "amd.com/gpu", "rocm", "amd64",
                   ({"key": "amd.com/gpu.device-id", "operator": "In", "values": ["74a1"]},), _AMD),
        GpuProfile("cpu", None, "cuda", "amd64", (), ()),
    )
}


def profile(name: str) -> GpuProfile:
    """The named profile; an unknown name is refused with the choices."""
    try:
        return PROFILES[name]
    except KeyError:
        raise ValueError(f"unknown GPU profile {name!r}: choose one of {', '.join(PROFILES)}") from None
