"""Build hook: generate the gRPC stubs (package `qkvcomm.v1`) from the project's proto files.

In the repository the protos are `../../proto`; an sdist carries a copy in `proto/` (the sdist
hook puts it there), so `pip wheel clients/python`, `python -m build clients/python` and a build
from the sdist all find them. Nothing is generated into the source tree. Metadata: pyproject.toml.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

HERE = Path(__file__).resolve().parent


def proto_root() -> Path:
    for root in (HERE / "proto", HERE.parent.parent / "proto"):
        if any(root.glob("qkvcomm/v1/*.proto")):
            return root
    raise RuntimeError(f"no qkvcomm/v1/*.proto under {HERE / 'proto'} or {HERE.parent.parent / 'proto'}")


class BuildPyWithStubs(build_py):
    def run(self) -> None:
        super().run()
        import grpc_tools  # build requirement (pyproject [build-system])
        from grpc_tools import protoc

        root, out = proto_root(), Path(self.build_lib)
        (out / "qkvcomm" / "v1").mkdir(parents=True, exist_ok=True)
        protos = sorted(str(p.relative_to(root)) for p in root.glob("qkvcomm/v1/*.proto"))
        include = Path(grpc_tools.__file__).parent / "_proto"  # google/protobuf/*.proto
        args = ["protoc", f"-I{root}", f"-I{include}", f"--python_out={out}", f"--pyi_out={out}",
                f"--grpc_python_out={out}", *protos]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {protos}")
        for package in ("qkvcomm", "qkvcomm/v1"):
            (out / package / "__init__.py").touch()
        (out / "qkvcomm" / "py.typed").touch()  # the .pyi stubs type every message (PEP 561)


class SdistWithProtos(sdist):
    def make_release_tree(self, base_dir: str, files: list[str]) -> None:
        super().make_release_tree(base_dir, files)
        root = proto_root()
        for proto in root.glob("qkvcomm/v1/*.proto"):
            target = Path(base_dir) / "proto" / proto.relative_to(root)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(proto, target)


setup(cmdclass={"build_py": BuildPyWithStubs, "sdist": SdistWithProtos})
