"""Start or stop a local CPU Triton server (the one bundled in nvidia-pytriton) in the background.

    python cluster/triton_local.py start --repository /path/to/repo [--models a,b] [--state FILE]
    python cluster/triton_local.py stop [--state FILE]
    python cluster/triton_local.py verify --repository /path/to/repo [--models a,b]

``start`` loads the Python-backend models (all of them unless ``--models``), prints the
URLs, writes pid/ports to the state file and returns while the server keeps running.
``stop`` stops that server's process group only. ``verify`` checks the models' files against
their manifests (``start`` does it too): run it before serving the repository with NVIDIA's
Triton container on GPU hosts (see cluster/README.md).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from adcore.serving.repository import RepositoryError, verify_repository
from adcore.serving.triton_server import (
    LocalTriton,
    process_group_alive,
    remove_bytecode,
    remove_shm_regions,
    stop_process_group,
)

DEFAULT_STATE = Path(".triton_local.json")


def start(repository: Path, models: list[str] | None, state_path: Path, ready_timeout_s: float) -> dict:
    if state_path.exists():
        old = json.loads(state_path.read_text())
        if process_group_alive(old["pid"]):
            raise SystemExit(f"{state_path}: a server (pid {old['pid']}) is already running; stop it first")
    # The workdir (log + backends folder) outlives this process: keep it next to the state file.
    workdir = state_path.resolve().parent / (state_path.stem + "_work")
    server = LocalTriton(repository, models=models, workdir=workdir, ready_timeout_s=ready_timeout_s)
    server.start()
    state = server.detach()
    state_path.write_text(json.dumps(state, indent=2))
    return state


def stop(state_path: Path) -> bool:
    if not state_path.exists():
        print(f"{state_path}: no state file, nothing to stop", file=sys.stderr)
        return False
    state = json.loads(state_path.read_text())
    cmdline = Path(f"/proc/{state['pid']}/cmdline")
    # Guard against a recycled pid: only signal a group whose leader is still a tritonserver.
    if cmdline.exists() and b"tritonserver" not in cmdline.read_bytes():
        print(f"pid {state['pid']} is no longer a tritonserver; not signalling it", file=sys.stderr)
    else:
        stop_process_group(state["pid"])
    remove_shm_regions(state.get("shm_prefix", ""))
    remove_bytecode(Path(state["repository"]), state["models"])
    state_path.unlink()
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_start = sub.add_parser("start", help="start a server in the background")
    p_start.add_argument("--repository", type=Path, required=True)
    p_start.add_argument("--models", default="", help="comma-separated; default: every Python-backend model")
    p_start.add_argument("--state", type=Path, default=DEFAULT_STATE)
    p_start.add_argument("--ready-timeout-s", type=float, default=60.0)
    p_stop = sub.add_parser("stop", help="stop the server recorded in the state file")
    p_stop.add_argument("--state", type=Path, default=DEFAULT_STATE)
    p_verify = sub.add_parser("verify", help="check the models' files against their manifests")
    p_verify.add_argument("--repository", type=Path, required=True)
    p_verify.add_argument("--models", default="", help="comma-separated; default: every model")
    args = parser.parse_args(argv)

    models = [m for m in getattr(args, "models", "").split(",") if m] or None
    try:
        if args.command == "verify":
            verify_repository(args.repository, models)
            print(f"{args.repository}: every model file matches its manifest")
            return 0
        if args.command == "start":
            state = start(args.repository, models, args.state, args.ready_timeout_s)
    except RepositoryError as e:
        raise SystemExit(str(e)) from None
    if args.command == "start":
        print(f"tritonserver pid {state['pid']} serving {', '.join(state['models'])}")
        print(f"HTTP  {state['http_url']}")
        print(f"gRPC  {state['grpc_url']}")
        print(f"log   {state['log_path']}")
        print(f"state {args.state}")
    else:
        stop(args.state)
    return 0


if __name__ == "__main__":
    sys.exit(main())
