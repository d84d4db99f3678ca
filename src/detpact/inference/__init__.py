"""Using a trained model: load it from a run and predict on images."""
