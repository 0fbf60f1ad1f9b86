"""The scheduler API of cpcoord: a typed client of the `cpcoord.v1.Coordinator` gRPC
service (docs/api.md). `Client` is the connection; everything it returns is a frozen
dataclass or a string enum of `cpcoord.api.values`; everything it raises is a
`cpcoord.errors.CpcoordError`.
"""

from __future__ import annotations

from cpcoord.api.client import Client
from cpcoord.api.values import (
    AbortReason,
    Agent,
    Damage,
    ForgottenNode,
    GcReport,
    Generation,
    GenerationDetail,
    GenerationState,
    Job,
    Level,
    Member,
    MemberGeneration,
    MemberHealth,
    MemberPages,
    MemberStats,
    ProgressEvent,
    ProgressKind,
    Region,
    RegionDiff,
    RegionPages,
    RestoreResult,
    StoreStats,
    Tracker,
    VerifyReport,
    WatchEvent,
    WatchKind,
)
from cpcoord.api.watch import Watch

__all__ = [
    "AbortReason",
    "Agent",
    "Client",
    "Damage",
    "ForgottenNode",
    "GcReport",
    "Generation",
    "GenerationDetail",
    "GenerationState",
    "Job",
    "Level",
    "Member",
    "MemberGeneration",
    "MemberHealth",
    "MemberPages",
    "MemberStats",
    "ProgressEvent",
    "ProgressKind",
    "Region",
    "RegionDiff",
    "RegionPages",
    "RestoreResult",
    "StoreStats",
    "Tracker",
    "VerifyReport",
    "Watch",
    "WatchEvent",
    "WatchKind",
]
