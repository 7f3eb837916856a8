"""The trace-driven mesh simulator for capacity planning.

Public surface (everything else is private to this package):

- traces: :class:`Request`, :func:`read_mooncake`, :func:`write_mooncake`, :func:`generate`
  with the :data:`CHAT` and :data:`AGENTIC` session shapes;
- specs: :class:`SimSpec` (cluster, model, cost, failure), :func:`load_spec`, :data:`MODEL_PRESETS`;
- running: :func:`simulate` -> :class:`RunResult`, :func:`summarize`, :func:`sweep`,
  :func:`prefix_hit_ratio` (the timing-free reference), :func:`write_html_report`;
- a replay through real daemons (``memkv-mesh bench replay``): :func:`replay_spec`,
  :func:`predict_replay` -> :class:`ReplayPrediction`.

The command line is ``memkv-mesh simulate mesh`` (``simulations/mesh_cli.py``).
"""

from .engine import Engine, EngineStats, FailureEvent, RunResult, simulate, with_restarts
from .ideal import hit_ratio_curve, prefix_hit_ratio
from .replay import ReplayPrediction, predict_replay, replay_spec
from .report import render_plots, write_html_report
from .spec import (
    MODEL_PRESETS,
    ClusterSpec,
    CostSpec,
    FailureSpec,
    ModelSpec,
    SimSpec,
    SpecError,
    load_spec,
    model_preset,
)
from .summary import summarize
from .sweep import sweep
from .synthetic import AGENTIC, CHAT, SessionShape, generate
from .trace import Request, TraceError, read_mooncake, write_mooncake

__all__ = [
    "AGENTIC",
    "CHAT",
    "MODEL_PRESETS",
    "ClusterSpec",
    "CostSpec",
    "Engine",
    "EngineStats",
    "FailureEvent",
    "FailureSpec",
    "ModelSpec",
    "ReplayPrediction",
    "Request",
    "RunResult",
    "SessionShape",
    "SimSpec",
    "SpecError",
    "TraceError",
    "generate",
    "hit_ratio_curve",
    "load_spec",
    "model_preset",
    "predict_replay",
    "prefix_hit_ratio",
    "read_mooncake",
    "render_plots",
    "replay_spec",
    "simulate",
    "summarize",
    "sweep",
    "write_html_report",
    "with_restarts",
    "write_mooncake",
]
