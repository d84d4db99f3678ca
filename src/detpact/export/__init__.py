"""ONNX export with a parity check against PyTorch."""
