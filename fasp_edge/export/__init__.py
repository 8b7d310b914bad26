"""Export: one export-friendly decoder, ExecuTorch and ONNX exporters, verified bundles."""
