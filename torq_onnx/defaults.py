"""Export defaults: what ``torq-onnx export`` gives with no options (the best row of the
evaluation table in the README), kept apart so the CLI can show them without heavy imports."""

DEFAULT_METHOD = "wush"
DEFAULT_WEIGHT_ROUNDING = "gptq"
