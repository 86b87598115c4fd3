"""The benchmark models, how to build one that is missing, and the prompt the throughput figures stream from.

run.py defined these and the other benchmarks imported them from it, closing a circle of imports between the
scripts; here they import no benchmark, so every script can share them and the imports point one way.
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PROMPT = (
    "Once upon a time there was a small server in a quiet city. Every night it answered questions "
    "about rivers, mountains and the stars, one token at a time."
)


@dataclass(frozen=True)
class ModelSpec:
    """A benchmark model: the make_model.py preset that builds it and how many tokens to ask for."""

    name: str
    preset: str
    path: Path
    tokens: int


SMALL = ModelSpec("small", "bench", REPO / "models" / "bench-random-llama-int4", 128)
REALISTIC = ModelSpec("realistic", "realistic", REPO / "models" / "realistic-random-qwen-shape-int4", 48)


def ensure_model(spec: ModelSpec) -> None:
    """Build the model with the repo's own script if it is not there yet."""
    if not (spec.path / "genai_config.json").is_file():
        print(f"building the {spec.name} model ({spec.preset})...", flush=True)
        build = subprocess.run(
            [sys.executable, str(REPO / "scripts" / "make_model.py"), spec.preset, "-o", str(spec.path)],
            capture_output=True,
            text=True,
        )
        if build.returncode != 0:  # the builder is chatty: show its output only when it failed
            sys.exit(f"building the {spec.name} model failed:\n{build.stdout}\n{build.stderr}")
