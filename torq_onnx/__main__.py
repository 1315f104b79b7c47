"""``python -m torq_onnx``: the ``torq-onnx`` command, where the scripts folder is not on PATH."""

from torq_onnx.cli import main

main()
