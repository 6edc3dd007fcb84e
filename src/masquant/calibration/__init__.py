"""Layer-by-layer calibration: capture, statistics, the pipeline, resume, streaming."""
