"""One exception family for the whole node.

Every error the node raises on purpose derives from :class:`DicomNodeError`;
there is one subclass per stage so callers can catch exactly what they handle.
The docstring of each class is its default message.
"""

from __future__ import annotations


class DicomNodeError(Exception):
    """dicomnode failed."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or "").strip())


class ConfigError(DicomNodeError):
    """The configuration is invalid."""


class StorageError(DicomNodeError):
    """An instance could not be stored."""


class StorageFullError(StorageError):
    """Free space on the data volume is below storage.min_free_mb."""


class InvalidInstanceError(StorageError):
    """The received dataset is not a storable DICOM instance."""


class IncompleteInstanceError(InvalidInstanceError):
    """The received dataset ends before its last element does (it was cut short)."""


class DatabaseError(DicomNodeError):
    """The database could not be used."""


class QueueError(DicomNodeError):
    """A job could not be queued, claimed or finished."""


class ImagingError(DicomNodeError):
    """The pixel data could not be prepared for a model."""


class UnsupportedImageError(ImagingError):
    """The image is of a kind the node does not process (it is skipped, not failed)."""


class ModelError(DicomNodeError):
    """A model card or its weights are invalid."""


class InferenceError(DicomNodeError):
    """Inference or explanation failed."""


class EncodeError(DicomNodeError):
    """A result object could not be encoded as DICOM."""


class SendError(DicomNodeError):
    """A result object could not be delivered to a peer."""


class AuthorizationError(SendError):
    """The Authorization for a peer's DICOMweb service could not be obtained."""


class TrainingError(DicomNodeError):
    """Training or evaluation failed."""


class PeerError(DicomNodeError):
    """A peer (application entity) is unknown or invalid."""


class AuditError(DicomNodeError):
    """An audit message could not be written to the audit record repository."""
