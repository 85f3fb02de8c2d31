"""Per-user prefix registry on MLflow + an object store (file:// or s3://). Needs no torch."""
from prefixfleet.registry.erasure import ErasureSnapshot, Forgotten
from prefixfleet.registry.errors import Forbidden, IntegrityError, InvalidUserKey, NotFound, RegistryError, Unavailable
from prefixfleet.registry.home import home_dir
from prefixfleet.registry.keys import UserKey
from prefixfleet.registry.maintenance import Fault, FsckReport, fsck, gc
from prefixfleet.registry.refs import ForgetReceipt, VersionRef
from prefixfleet.registry.registry import Registry, RegistryAddress

__all__ = [
    "ErasureSnapshot", "Fault", "Forbidden", "ForgetReceipt", "Forgotten", "FsckReport", "IntegrityError",
    "InvalidUserKey", "NotFound", "Registry", "RegistryAddress", "RegistryError", "Unavailable", "UserKey",
    "VersionRef", "fsck", "gc", "home_dir",
]
