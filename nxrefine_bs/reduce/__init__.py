"""reduce subpackage of nxrefine-bs."""
