"""Build hook: generate the protobuf/gRPC modules from proto/ into snapshotd/wire/_proto.

The generated code is never committed. ``pip install .`` and ``pip install -e .`` both
run ``build_py``, which runs grpc_tools.protoc first. ``-Isnapshotd/wire/_proto=proto`` makes
the generated imports package-qualified (``from snapshotd.wire._proto import ...``).
"""

import glob
import os

from setuptools import setup
from setuptools.command.build_py import build_py


def generate_proto() -> None:
    from grpc_tools import protoc  # provided by [build-system].requires

    root = os.path.dirname(os.path.abspath(__file__))
    protos = sorted(glob.glob(os.path.join(root, "proto", "*.proto")))
    if not protos:
        raise RuntimeError("no .proto files under proto/")
    include = os.path.join(os.path.dirname(protoc.__file__), "_proto")
    args = [
        "grpc_tools.protoc",
        f"-Isnapshotd/wire/_proto={os.path.join(root, 'proto')}",
        f"-I{include}",
        f"--python_out={root}",
        f"--pyi_out={root}",
        f"--grpc_python_out={root}",
    ] + [f"snapshotd/wire/_proto/{os.path.basename(p)}" for p in protos]
    if protoc.main(args) != 0:
        raise RuntimeError("grpc_tools.protoc failed: " + " ".join(args))


class BuildPyWithProto(build_py):
    def run(self):
        generate_proto()
        super().run()


setup(cmdclass={"build_py": BuildPyWithProto})
