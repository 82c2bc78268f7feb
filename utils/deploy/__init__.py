"""Deployment: open any model file (runtime), run it on image files (inference), export/verify ONNX, TorchScript
and TensorRT files (export, tensorrt_engine), int8 quantization checks (int8, int8_check), the fastest forward
engine for a CPU (engine) and structured channel pruning (prune)."""
