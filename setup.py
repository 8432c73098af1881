"""Build hook: generate the gRPC stubs (package `qkvcomm.v1`) from proto/ while building.

`pip install .`, `python -m build` and the Dockerfile all get the stubs inside the wheel
this way; nothing is generated into the source tree. Metadata lives in pyproject.toml.
"""
from __future__ import annotations

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
PROTO = ROOT / "proto"


class BuildPyWithStubs(build_py):
    def run(self) -> None:
        super().run()
        import grpc_tools  # build requirement (pyproject [build-system])
        from grpc_tools import protoc

        out = Path(self.build_lib)
        (out / "qkvcomm" / "v1").mkdir(parents=True, exist_ok=True)
        protos = sorted(str(p.relative_to(PROTO)) for p in PROTO.glob("qkvcomm/v1/*.proto"))
        if not protos:
            raise RuntimeError(f"no .proto files under {PROTO}/qkvcomm/v1 (an sdist made without MANIFEST.in?)")
        include = Path(grpc_tools.__file__).parent / "_proto"  # google/protobuf/*.proto
        args = ["protoc", f"-I{PROTO}", f"-I{include}", f"--python_out={out}", f"--pyi_out={out}",
                f"--grpc_python_out={out}", *protos]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {protos}")
        for package in ("qkvcomm", "qkvcomm/v1"):
            (out / package / "__init__.py").touch()


setup(cmdclass={"build_py": BuildPyWithStubs})
