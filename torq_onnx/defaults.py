"""Export defaults: what ``torq-onnx export`` gives with no options (the best row of the
evaluation table in the README), kept apart so the CLI can show them without heavy imports."""

METHODS = ("rtn", "brq", "quarot", "torq", "wush", "torq-wush")
WEIGHT_MODES = ("mxfp4", "fake", "float")  # packed MXFP4 | quantize-dequantized float | unquantized
WEIGHT_ROUNDINGS = ("rtn", "gptq")
SCALE_RULES = ("floor", "even", "rceil")  # mxfp4.ScaleRule's values
SOURCE_DTYPES = ("fp32", "fp16")  # graph dtypes of HF/GGUF exports; ORT's CPU provider has no bfloat16 kernels

DEFAULT_METHOD = "wush"
DEFAULT_WEIGHT_ROUNDING = "gptq"
