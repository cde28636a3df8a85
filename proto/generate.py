"""Regenerate the Python stubs in frontend/kmsv2/ from proto/api.proto.

    python proto/generate.py            # write the stubs
    python proto/generate.py --check    # exit 1 if the committed stubs are stale

The proto is compiled as keysealer/frontend/kmsv2/api.proto so the generated modules import each other by
their namespaced name instead of a generic top-level `api_pb2`.
"""

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO = ROOT / "proto" / "api.proto"
PACKAGE_PATH = Path("keysealer/frontend/kmsv2")
OUTPUT = ROOT / "frontend" / "kmsv2"
GENERATED = ("api_pb2.py", "api_pb2.pyi", "api_pb2_grpc.py")


def generate(into: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "src"
        (source / PACKAGE_PATH).mkdir(parents=True)
        shutil.copy(PROTO, source / PACKAGE_PATH / "api.proto")
        out = Path(tmp) / "out"
        out.mkdir()
        code = protoc.main([
            "protoc", f"-I{source}", f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}",
            str(PACKAGE_PATH / "api.proto"),
        ])
        if code != 0:
            raise SystemExit(f"protoc failed with code {code}")
        for name in GENERATED:
            shutil.copy(out / PACKAGE_PATH / name, into / name)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args()
    if not args.check:
        generate(OUTPUT)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        stale = [n for n in GENERATED if (Path(tmp) / n).read_bytes() != (OUTPUT / n).read_bytes()]
    if stale:
        print(f"stale generated stubs: {', '.join(stale)}; run python proto/generate.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
