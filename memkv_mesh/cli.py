"""The ``memkv-mesh`` command line: a testable ``main(argv) -> int``.

Subcommands that belong to other packages (the simulators, the gossip driver) are delegated by
passing the remaining arguments to that package's own ``main(argv) -> int``, so each part owns its
flags and help text and this file stays a table of contents.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# subcommand path -> "module:function" taking the remaining argv and returning an exit code.
_DELEGATES: dict[tuple[str, ...], str] = {
    ("daemon",): "memkv_mesh.daemon_cli:main",
    ("status",): "memkv_mesh.daemon_cli:status_main",
    ("bench", "local"): "memkv_mesh.bench_local:main",
    ("bench", "anchors"): "memkv_mesh.bench_anchors:main",
    ("bench", "mesh"): "memkv_mesh.bench_mesh:main",
    ("bench", "replay"): "memkv_mesh.bench_replay:main",
    ("bench", "fuzz"): "memkv_mesh.bench_fuzz:main",
    ("demo", "ttft"): "memkv_mesh.demo_ttft:main",
    ("demo", "vllm"): "memkv_mesh.demo_vllm:main",
    ("members",): "memkv_mesh.daemon_cli:members_main",
    ("simulate", "membership"): "simulations.membership_cli:main",
    ("simulate", "mesh"): "simulations.mesh_cli:main",
    ("simulate", "eviction"): "simulations.eviction_cli:main",
    ("simulate", "directory"): "simulations.directory_sim:main",
}

_HELP = {
    "daemon": "run the node's sidecar daemon",
    "status": "print a running daemon's node, tiers, usage and hit/miss counts",
    "bench": "benchmarks (local, anchors, mesh, replay, fuzz)",
    "demo": "end-to-end time-to-first-token demos (transformers, vLLM)",
    "members": "list the mesh members a running daemon knows",
    "simulate": "simulators (membership, mesh, eviction, directory)",
}


def _usage() -> str:
    lines = ["usage: memkv-mesh COMMAND [ARGS...]", "", "commands:"]
    for path in _DELEGATES:
        lines.append(f"  {' '.join(path):<22} {_HELP.get(path[0], '')}")
    lines.append("")
    lines.append("Run 'memkv-mesh COMMAND --help' for a command's flags.")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0 if args else 2
    if args[0] == "--version":
        from memkv_mesh import __version__

        print(__version__)
        return 0
    for path, target in sorted(_DELEGATES.items(), key=lambda kv: -len(kv[0])):
        if tuple(args[: len(path)]) == path:
            module_name, func_name = target.split(":")
            func = getattr(importlib.import_module(module_name), func_name)
            code: int = func(args[len(path) :])
            return code
    parser = argparse.ArgumentParser(prog="memkv-mesh")
    parser.error(f"unknown command {' '.join(args[:2])!r}\n\n{_usage()}")
    return 2  # pragma: no cover - parser.error exits


if __name__ == "__main__":
    raise SystemExit(main())
