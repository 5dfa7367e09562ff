"""nexus subpackage of nxrefine-bs."""
