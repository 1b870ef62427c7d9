"""The qtool command line (installed as ``qtool.cli``; console script ``qtool``)."""

from __future__ import annotations

import click

import qtool


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(qtool.__version__, prog_name="qtool")
def main() -> None:
    """Quantize ONNX models by the rules of an inference engine."""
