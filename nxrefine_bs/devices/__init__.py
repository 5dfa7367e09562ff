"""devices subpackage of nxrefine-bs."""
