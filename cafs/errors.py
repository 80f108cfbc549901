"""The exception types of cafs.

Every error a user can meet is one of these. Lower layers raise them; the command
edge (``cafs.cli``) maps them to exit codes and the FUSE edge maps them to errno, each in
one place. A message names the thing it is about (a path, a URL, an object id).
"""


class CafsError(Exception):
    """Base of every cafs error."""


class FormatError(CafsError):
    """Bytes from outside do not decode as the object they claim to be."""


class IntegrityError(CafsError):
    """Bytes decoded but do not match the id they were asked for."""


class StoreError(CafsError):
    """A store failed to get, put, list or delete an object."""


class StoreUnavailable(StoreError):
    """The store did not answer properly this time (refused, reset, timed out, a 5xx, a
    short body): worth retrying later, unlike a missing object or a refused credential."""


class FetcherClosed(StoreError):
    """Reads from the store were stopped because the mount is being unmounted."""


class ListingUnavailable(StoreError):
    """The store cannot list keys (a web server without directory indexes): objects can
    still be read by name."""


class ObjectNotFound(StoreError):
    """The store has no object of that name."""


class OtherRepository(StoreError):
    """A mirror holds another repository, or none: it is never read for this one. No
    retry cures it, so a read moves on to the next source at once."""


class NoSpaceError(StoreError):
    """The disk under a store, the cache or a destination is full."""


class RepositoryError(CafsError):
    """A repository is missing, not a repository, or not of a version we read."""


class RefError(CafsError):
    """A ref name is invalid, or a ref or snapshot does not exist."""


class PathNotFound(CafsError):
    """A path inside a snapshot does not exist."""


class UsageError(CafsError):
    """Options or arguments that make no sense."""


class ExtractError(CafsError):
    """Extraction could not write a destination."""
