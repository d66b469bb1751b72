"""Generates the task service's gRPC stubs shipped in `sigil_agent._pb`.

Usage (from anywhere, with grpcio-tools installed at the version pinned in
`clients/python/requirements-test.txt`):

    python clients/python/scripts/gen_stubs.py          # rewrite the stubs
    python clients/python/scripts/gen_stubs.py --check  # exit 1 if they differ

The source of truth is `proto/sigil/workload/v1/tasks.proto` at the top of
the repository. It is compiled as if it lived at `sigil_agent/_pb/tasks.proto`
so the generated modules import each other as `sigil_agent._pb.…` and never
claim a top-level `sigil` package; the proto package (`sigil.workload.v1`)
and so the gRPC method paths are unchanged. The test suite runs `--check`,
so a proto change without regenerated stubs fails.
"""

from __future__ import annotations

import argparse
import importlib.resources
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PACKAGE = HERE.parent / "src" / "sigil_agent" / "_pb"
PROTO = HERE.parents[2] / "proto" / "sigil" / "workload" / "v1" / "tasks.proto"
OUTPUTS = ("tasks_pb2.py", "tasks_pb2.pyi", "tasks_pb2_grpc.py")


def generate(into: Path) -> None:
    """Writes the three stub files into `into`."""
    from grpc_tools import protoc

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        (src / "sigil_agent" / "_pb").mkdir(parents=True)
        shutil.copyfile(PROTO, src / "sigil_agent" / "_pb" / "tasks.proto")
        out = Path(tmp) / "out"
        out.mkdir()
        includes = str(importlib.resources.files("grpc_tools") / "_proto")
        code = protoc.main(
            [
                "grpc_tools.protoc",
                f"-I{src}",
                f"-I{includes}",
                f"--python_out={out}",
                f"--pyi_out={out}",
                f"--grpc_python_out={out}",
                "sigil_agent/_pb/tasks.proto",
            ]
        )
        if code != 0:
            raise SystemExit(f"protoc failed on {PROTO} (exit {code})")
        for name in OUTPUTS:
            shutil.copyfile(out / "sigil_agent" / "_pb" / name, into / name)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check",
        action="store_true",
        help="compare with the shipped stubs instead of writing them",
    )
    args = parser.parse_args()
    if not args.check:
        generate(PACKAGE)
        print(f"wrote {', '.join(OUTPUTS)} into {PACKAGE}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        stale = [
            name
            for name in OUTPUTS
            if not (PACKAGE / name).exists()
            or (PACKAGE / name).read_bytes() != (Path(tmp) / name).read_bytes()
        ]
    if stale:
        print(
            f"the shipped stubs {', '.join(stale)} do not match {PROTO}; "
            f"run: python {Path(__file__).relative_to(HERE.parents[2])}",
            file=sys.stderr,
        )
        return 1
    print("the shipped stubs match the proto")
    return 0


if __name__ == "__main__":
    sys.exit(main())
