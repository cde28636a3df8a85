"""Regenerate the Python stubs in frontend/kmsv2/ and frontend/kmsv1/ from proto/api.proto and
proto/v1beta1.proto.

    python proto/generate.py            # write the stubs
    python proto/generate.py --check    # exit 1 if the committed stubs are stale

Each proto is compiled as keysealer/frontend/<package>/api.proto so the generated modules import each other
by their namespaced name instead of a generic top-level `api_pb2`.
"""

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
# proto file -> the frontend package its stubs go to
PROTOS = {ROOT / "proto" / "api.proto": "kmsv2", ROOT / "proto" / "v1beta1.proto": "kmsv1"}
GENERATED = ("api_pb2.py", "api_pb2.pyi", "api_pb2_grpc.py")


def generate(proto: Path, package: str, into: Path) -> None:
    package_path = Path("keysealer/frontend") / package
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "src"
        (source / package_path).mkdir(parents=True)
        shutil.copy(proto, source / package_path / "api.proto")
        out = Path(tmp) / "out"
        out.mkdir()
        code = protoc.main([
            "protoc", f"-I{source}", f"--python_out={out}", f"--pyi_out={out}", f"--grpc_python_out={out}",
            str(package_path / "api.proto"),
        ])
        if code != 0:
            raise SystemExit(f"protoc failed with code {code}")
        for name in GENERATED:
            shutil.copy(out / package_path / name, into / name)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args()
    stale = []
    for proto, package in PROTOS.items():
        output = ROOT / "frontend" / package
        if not args.check:
            generate(proto, package, output)
            continue
        with tempfile.TemporaryDirectory() as tmp:
            generate(proto, package, Path(tmp))
            stale += [f"{package}/{n}" for n in GENERATED if (Path(tmp) / n).read_bytes() != (output / n).read_bytes()]
    if stale:
        print(f"stale generated stubs: {', '.join(stale)}; run python proto/generate.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
