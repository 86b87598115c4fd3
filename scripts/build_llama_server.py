"""Build llama.cpp's ``llama-server`` and ``llama-quantize`` from source, and turn a benchmark model's Hugging Face
weights into a Q4_0 GGUF: the yardstick the benchmark measures this server against, on the same weights.

No prebuilt binary can be fetched here, but the ``llama-cpp-python`` sdist on PyPI vendors the whole llama.cpp
tree, so that is where the source comes from. Nothing built or downloaded is committed: it all lands in
``.cache/llama.cpp`` (ignored) and ``models/``.

Usage::

    python scripts/build_llama_server.py build         # ~10 min on 2 cores; prints the binaries' paths
    python scripts/build_llama_server.py gguf bench    # models/bench-random-llama-hf -> models/...-q4_0.gguf

``gguf`` needs ``pip install -r requirements-build.txt`` (the converter imports torch and transformers) and the
Hugging Face folder that ``python scripts/make_model.py PRESET`` keeps beside the ONNX model.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / ".cache" / "llama.cpp"
VERSION = "0.3.36"  # llama-cpp-python; its vendor/llama.cpp is the tree we build
BUILD = CACHE / "build"
SERVER = BUILD / "bin" / "llama-server"
QUANTIZE = BUILD / "bin" / "llama-quantize"

# Our models' tokenizer is a byte-level BPE that the converter does not know: it hashes what a BPE pre-tokenizer
# does to a test text and refuses unknown ones, and it tries SentencePiece first for Llama. It splits like GPT-2's,
# which llama.cpp names "gpt-2" (with the dash), so the conversion is told exactly that.
_CONVERT = """
import sys
sys.path.insert(0, sys.argv.pop(1))
import convert_hf_to_gguf as convert
from conversion import base, llama
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
llama.LlamaModel.set_vocab = lambda self: self._set_vocab_gpt2()
convert.main()
"""


def source() -> Path:
    """The llama.cpp tree of the sdist, downloaded and unpacked once."""
    tree = CACHE / f"llama_cpp_python-{VERSION}" / "vendor" / "llama.cpp"
    if tree.is_dir():
        return tree
    CACHE.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            f"llama-cpp-python=={VERSION}",
            "-d",
            str(CACHE),
        ],
        check=True,
    )
    with tarfile.open(CACHE / f"llama_cpp_python-{VERSION}.tar.gz") as archive:
        archive.extractall(CACHE, filter="data")
    return tree


def build() -> None:
    """cmake the server and the quantizer for this CPU, with nothing that would reach the network (curl, the
    prebuilt UI). AMX is left out: on a Xeon that has it, a sandbox that does not grant the tile state made the
    AMX matmul segfault at the first decode (seen here); without it the AVX-512/AVX2 kernels serve."""
    tree = source()
    subprocess.run(
        [
            "cmake",
            "-S",
            str(tree),
            "-B",
            str(BUILD),
            "-DCMAKE_BUILD_TYPE=Release",
            "-DLLAMA_CURL=OFF",
            "-DLLAMA_USE_PREBUILT_UI=OFF",
            "-DLLAMA_BUILD_SERVER=ON",
            "-DLLAMA_BUILD_TESTS=OFF",
            "-DLLAMA_BUILD_EXAMPLES=OFF",
            "-DGGML_NATIVE=ON",
            "-DCMAKE_C_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16",
            "-DCMAKE_CXX_FLAGS=-mno-amx-tile -mno-amx-int8 -mno-amx-bf16",
        ],
        check=True,
    )
    subprocess.run(
        [
            "cmake",
            "--build",
            str(BUILD),
            "--target",
            "llama-server",
            "llama-quantize",
            "-j",
            str(len(os.sched_getaffinity(0))),
        ],
        check=True,
    )
    print(f"built {SERVER} and {QUANTIZE}", file=sys.stderr)


def gguf(hf_dir: Path, output: Path) -> None:
    """HF weights -> f32 GGUF (the sdist's own converter) -> Q4_0 (llama-quantize)."""
    tree = source()
    f32 = output.with_suffix(".f32.gguf")
    subprocess.run(
        [sys.executable, "-c", _CONVERT, str(tree), str(hf_dir), "--outtype", "f32", "--outfile", str(f32)],
        check=True,
        env={**os.environ, "PYTHONPATH": str(tree / "gguf-py")},
    )
    subprocess.run([str(QUANTIZE), str(f32), str(output), "Q4_0"], check=True)
    f32.unlink()
    print(f"built {output}", file=sys.stderr)


def main() -> None:
    """``build`` the binaries, or convert a preset's weights to ``gguf``."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("build", help="build llama-server and llama-quantize")
    convert = sub.add_parser("gguf", help="convert a benchmark model's HF weights to Q4_0 GGUF")
    convert.add_argument("preset", help="bench or realistic (as in scripts/make_model.py)")
    args = parser.parse_args()
    if args.command == "build":
        build()
    else:
        sys.path.insert(0, str(REPO / "scripts"))
        from make_model import PRESETS, hf_folder

        preset = PRESETS[args.preset]
        gguf(hf_folder(preset), REPO / "models" / f"{preset.name.removesuffix('-int4')}-q4_0.gguf")


if __name__ == "__main__":
    main()
