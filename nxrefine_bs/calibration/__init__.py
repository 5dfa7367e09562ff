"""calibration subpackage of nxrefine-bs."""
