"""Small reference multimodal models trained by the project on real, offline data."""
