"""Models at serving time: spec, registry, backends (Keras, ONNX Runtime), explanations."""
