"""callbacks subpackage of nxrefine-bs."""
