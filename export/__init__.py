"""reformer_rt.export: PyTorch Reformer -> ONNX (LSH attention as a plugin node or as portable standard ops)."""
