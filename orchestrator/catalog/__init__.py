"""The model catalog: signed, versioned models with lineage and a lifecycle, where they run, the
compliance report, and remote wipe (docs/lifecycle.md).

* :mod:`.signing` — Ed25519 publisher keys, the canonical digest a publisher signs, trust.
* :mod:`.lifecycle` — model version states and their allowed transitions.
* :mod:`.views` — placements (which node runs which version, since when, how attested) and the
  compliance report.
* :mod:`.wipe` — remote wipe: revoke, evict, order the nodes, track confirmations, quarantine.
* :mod:`.misuse` — invocation counts per model per node, alerts on wiped or surging models.
"""

from .config import CatalogConfig, MisuseConfig
from .errors import CatalogError, SignatureRefused
from .lifecycle import ModelState
from .signing import PublisherKey, PublisherTrust, canonical_digest, sign_metadata

__all__ = [
    "CatalogConfig",
    "CatalogError",
    "MisuseConfig",
    "ModelState",
    "PublisherKey",
    "PublisherTrust",
    "SignatureRefused",
    "canonical_digest",
    "sign_metadata",
]
