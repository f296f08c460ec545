"""The benchmark server process: `create_server` plus the raw service; prints its port, stops on EOF.

Default settings, except --allow-shm (off by default) so the shared memory case can run."""

from __future__ import annotations

import argparse
import sys

from weightavg_server.ops.app import create_server, set_serving
from weightavg_server.ops.config import ServerConfig

from ._raw import add_raw_service


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench._server")
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    server, port, health_servicer = create_server(ServerConfig.from_env(host="127.0.0.1", port=0, device=args.device, allow_shm=True))
    add_raw_service(server)
    server.start()
    set_serving(health_servicer, True)
    print(port, flush=True)
    sys.stdin.read()  # the parent closes our stdin to stop us
    server.stop(grace=None)


if __name__ == "__main__":
    main()
