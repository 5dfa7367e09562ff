"""tiled subpackage of nxrefine-bs."""
