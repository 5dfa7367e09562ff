"""simulation subpackage of nxrefine-bs."""
