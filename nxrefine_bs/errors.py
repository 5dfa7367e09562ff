"""The one error hierarchy of nxrefine-bs.

Every error raised on purpose by this package derives from :class:`NXRefineBSError`
and also from the built-in exception that fits (``ValueError``, ``KeyError``...), so
callers can catch either.  Messages say what failed, where (file, entry, key, uid)
and how to fix it.
"""

from __future__ import annotations

__all__ = [
    "NXRefineBSError",
    "SettingsError",
    "InvalidNameError",
    "PathSafetyError",
    "ExperimentError",
    "RawDataError",
    "TemplateError",
    "ScanFileError",
    "FileExistsNXError",
    "BeamlineNotFoundError",
    "MetadataError",
    "DeviceConnectionError",
    "WriterError",
    "DataLinkError",
    "ReductionError",
    "IndexingError",
    "RefinementError",
    "CalibrationError",
    "CalibrationQualityError",
    "WorkflowError",
    "GeometryError",
    "LatticeError",
    "MaskError",
    "ParameterError",
    "TiledError",
    "ReplayError",
    "SpecFileError",
]


class NXRefineBSError(Exception):
    """Base class of every error raised on purpose by nxrefine-bs."""


class SettingsError(NXRefineBSError, ValueError):
    """A settings file or value is missing, unknown or of the wrong type."""


class InvalidNameError(NXRefineBSError, ValueError):
    """A sample, label, scan or experiment name is not a safe single path component."""


class PathSafetyError(NXRefineBSError, ValueError):
    """A path would leave the experiment tree or overwrite raw data."""


class ExperimentError(NXRefineBSError, ValueError):
    """An experiment directory is missing or malformed."""


class RawDataError(ExperimentError):
    """The raw tree of an import (image directories, images) is missing, malformed or unreadable."""


class TemplateError(NXRefineBSError, ValueError):
    """A configuration template cannot be created or read."""


class ScanFileError(NXRefineBSError, ValueError):
    """A scan file cannot be created, read or updated."""


class FileExistsNXError(NXRefineBSError, FileExistsError):
    """A file exists and would be overwritten without ``overwrite=True``."""


class BeamlineNotFoundError(NXRefineBSError, KeyError):
    """No beamline class is registered under the requested name."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class MetadataError(NXRefineBSError, ValueError):
    """Run metadata (start document, plan arguments) is missing or invalid."""


class WriterError(NXRefineBSError, RuntimeError):
    """The NeXus scan-file writer could not write a run (the run is failed, not lost)."""


class DataLinkError(NXRefineBSError, FileNotFoundError):
    """A scan's external link to detector data points at a missing file or dataset."""


class ReductionError(NXRefineBSError, RuntimeError):
    """A reduction step failed."""


class IndexingError(ReductionError):
    """Peaks could not be indexed (too few peaks, wrong cell, phase transition...)."""


class RefinementError(ReductionError):
    """A least-squares refinement failed or did not converge."""


class CalibrationError(NXRefineBSError, RuntimeError):
    """Powder calibration failed (unreadable image, too few rings...)."""


class CalibrationQualityError(CalibrationError):
    """A powder calibration fit was rejected: too few rings found or too large an RMS."""


class WorkflowError(NXRefineBSError, RuntimeError):
    """Queuing, executing or tracking reduction work failed."""


class GeometryError(NXRefineBSError, ValueError):
    """Invalid geometry parameters (detector orientation string, lattice...)."""


class LatticeError(GeometryError):
    """Inconsistent or unknown unit cell / space group."""


class MaskError(CalibrationError, ValueError):
    """A pixel mask cannot be built, read or written (wrong shape, missing entry...)."""


class ParameterError(NXRefineBSError, TypeError):
    """A step was given a parameter it does not have, or a value of the wrong type."""


class TiledError(NXRefineBSError, RuntimeError):
    """The Tiled catalog cannot be opened or written."""


class ReplayError(NXRefineBSError, LookupError):
    """Archived runs cannot be found or replayed."""


class SpecFileError(MetadataError):
    """A SPEC file is missing, unreadable or malformed (the message names file and line)."""


class DeviceConnectionError(NXRefineBSError, ConnectionError):
    """Beamline devices (EPICS PVs) did not connect; the message names the PVs."""

    @classmethod
    def from_failures(
        cls, failures: list[str], timeout: float, api: str = ""
    ) -> DeviceConnectionError:
        """The error for ``failures`` (``"<device>: <PVs or reason>"`` each).

        >>> str(DeviceConnectionError.from_failures(["phi: SIM:phi.RBV"], 5))[:52]
        'EPICS devices did not connect within 5 s - phi: SIM:'
        """
        which = f"EPICS devices ({api})" if api else "EPICS devices"
        return cls(
            f"{which} did not connect within {timeout} s - "
            + "; ".join(failures)
            + ". Is the IOC running and are EPICS_CA_ADDR_LIST and the [instrument] prefixes "
            "right?"
        )
