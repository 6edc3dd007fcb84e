"""Loading, saving, exporting and calibration files."""
