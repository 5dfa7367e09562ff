"""workflow subpackage of nxrefine-bs."""
