"""Regenerate the Python stubs of the chainrule wire contract.

    python proto/generate.py           # rewrite the stubs beside the .proto
    python proto/generate.py --check   # exit 1 if the committed stubs are stale

The stubs (``chainrule_pb2.py``, ``chainrule_pb2.pyi``, ``chainrule_pb2_grpc.py``)
are generated beside ``chainrule.proto`` and committed; never edit them by
hand. With ``proto/`` as the import root their imports read
``from chainrule.v1 import chainrule_pb2``, which is where packaging installs
them. Works from any working directory. ``chainrule.binpb`` is generated and
committed beside them too: the contract's descriptor (a FileDescriptorSet)
with the comments the stubs lack, which server reflection serves
(``chainrule.server.reflection``).

The google/rpc files the contract imports are compiled from the copies in
``proto/third_party/`` (the ones a client in another language uses, and buf
compiles against); the generated code still imports ``google.rpc.*_pb2`` from
googleapis-common-protos at run time, whose descriptors are the same files.

The generated code records the grpcio-tools and protobuf versions that made
it, so ``--check`` also fails when a different grpcio-tools is installed than
the one that generated the committed stubs; the message says so.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
from importlib import metadata, util
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"
# Path of the contract relative to PROTO_ROOT: this is also its import path.
PROTO = "chainrule/v1/chainrule.proto"
PACKAGE_DIR = PROTO_ROOT / "chainrule" / "v1"
# google/rpc/status.proto and error_details.proto, shipped for clients.
THIRD_PARTY = PROTO_ROOT / "third_party"
DESCRIPTOR_SET = "chainrule.binpb"
OUTPUTS = ("chainrule_pb2.py", "chainrule_pb2.pyi", "chainrule_pb2_grpc.py", DESCRIPTOR_SET)


def _package_root(module: str, marker: str) -> Path:
    """The directory that holds ``marker`` (a .proto path) for an installed module."""
    spec = util.find_spec(module)
    if spec is None or spec.origin is None:
        sys.exit(f"generate.py: cannot find {module}; install the test extra (pip install -e '.[test]')")
    # Walk up from the module file to the directory under which `marker` lives.
    for parent in Path(spec.origin).resolve().parents:
        if (parent / marker).is_file():
            return parent
    sys.exit(f"generate.py: {marker} not found above {spec.origin}")


def include_paths() -> list[Path]:
    """Import roots: ours, then google.rpc (proto/third_party), then the well-known types."""
    return [
        PROTO_ROOT,
        THIRD_PARTY,
        # google/protobuf/*.proto, bundled with grpcio-tools (and with every protoc and buf).
        _package_root("grpc_tools", "_proto/google/protobuf/any.proto") / "_proto",
    ]


def generate(out_dir: Path) -> None:
    """Run protoc over the contract, writing the stubs and the descriptor set under ``out_dir``."""
    package_out = out_dir / Path(PROTO).parent
    package_out.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "grpc_tools.protoc"]
    command += [f"-I{path}" for path in include_paths()]
    command += [
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        # this file only (no imports), with its comments
        "--include_source_info",
        f"--descriptor_set_out={package_out / DESCRIPTOR_SET}",
        str(PROTO_ROOT / PROTO),
    ]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if result.returncode != 0:
        sys.exit(f"generate.py: protoc failed:\n{result.stderr}")


def _stamp(path: Path) -> str | None:
    """The grpcio-tools version recorded in a generated _grpc.py, if any."""
    if not path.is_file():
        return None
    found = re.search(r"^GRPC_GENERATED_VERSION = '([^']+)'", path.read_text(), re.MULTILINE)
    return found.group(1) if found else None


def check() -> int:
    """Compare freshly generated stubs with the committed ones, byte for byte."""
    problems: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        fresh_dir = Path(tmp) / "chainrule" / "v1"
        for name in OUTPUTS:
            committed_file = PACKAGE_DIR / name
            shown = committed_file.relative_to(ROOT)
            if not committed_file.is_file():
                problems.append(f"missing: {shown}")
            elif committed_file.read_bytes() != (fresh_dir / name).read_bytes():
                problems.append(f"stale: {shown} differs from what {PROTO} generates")
        if not problems:
            return 0
        committed = _stamp(PACKAGE_DIR / "chainrule_pb2_grpc.py")
        installed = _stamp(fresh_dir / "chainrule_pb2_grpc.py")
    for problem in problems:
        print(problem, file=sys.stderr)
    if committed is not None and committed != installed:
        print(
            f"note: the committed stubs were generated by grpcio-tools {committed}, "
            f"but grpcio-tools {metadata.version('grpcio-tools')} is installed",
            file=sys.stderr,
        )
    print("run `make stubs` (python proto/generate.py) and commit the result", file=sys.stderr)
    return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check",
        action="store_true",
        help="generate into a temporary directory and fail if the committed stubs differ",
    )
    args = parser.parse_args(argv)
    if args.check:
        return check()
    generate(PROTO_ROOT)
    for name in OUTPUTS:
        print(f"wrote {(PACKAGE_DIR / name).relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
