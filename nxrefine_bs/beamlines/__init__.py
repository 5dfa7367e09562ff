"""beamlines subpackage of nxrefine-bs."""
