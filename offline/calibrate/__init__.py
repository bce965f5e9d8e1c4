"""Calibration text: reading, checking and cutting it into token windows."""
