"""Accuracy on ShapesVQA: the procedural task, the small LLaVA the project trains on it, its training and replay, and
the commands that measure methods on it (quality, demo, the position probe)."""
