"""Build hook: generate the protobuf/gRPC modules from protos/ before packaging.

The generated files land in service/headswap/protocol/ (git-ignored) so that both a wheel
and an editable install carry them; nobody edits them by hand.
"""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent
PROTO_ROOT = ROOT / "protos"
OUT_ROOT = ROOT / "service"


def generate_protos() -> None:
    import grpc_tools
    from grpc_tools import protoc

    include = str(Path(grpc_tools.__file__).parent / "_proto")
    for proto in sorted(PROTO_ROOT.rglob("*.proto")):
        args = ["grpc_tools.protoc", f"-I{PROTO_ROOT}", f"-I{include}", f"--python_out={OUT_ROOT}",
                f"--pyi_out={OUT_ROOT}", f"--grpc_python_out={OUT_ROOT}", str(proto)]
        if protoc.main(args) != 0:
            raise RuntimeError(f"protoc failed on {proto}")
    init = OUT_ROOT / "headswap" / "protocol" / "__init__.py"
    init.write_text('"""Generated from protos/ by the build (setup.py). Do not edit."""\n')


class BuildPyWithProtos(build_py):
    def run(self) -> None:
        generate_protos()
        super().run()


# Also before setup(): package discovery runs first and must see headswap.protocol in a clean tree.
generate_protos()
setup(cmdclass={"build_py": BuildPyWithProtos})
