"""plans subpackage of nxrefine-bs."""
