"""Per-user prefix registry on MLflow + an object store (file:// or s3://). Needs no torch."""
from registry.errors import IntegrityError, InvalidUserKey, NotFound, RegistryError
from registry.keys import UserKey
from registry.maintenance import Fault, FsckReport
from registry.refs import ForgetReceipt, PublishRequest, VersionRef
from registry.registry import Registry

__all__ = [
    "Fault", "ForgetReceipt", "FsckReport", "IntegrityError", "InvalidUserKey", "NotFound",
    "PublishRequest", "Registry", "RegistryError", "UserKey", "VersionRef",
]
