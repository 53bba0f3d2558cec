"""Stand-ins for the reconciler's trust seam (the fleet verifier) in tests that feed node messages by
hand and run no attestation."""

from __future__ import annotations

from collections.abc import Iterable

from attestation.errors import KeyReleaseError


class NoTrust:
    """No node is attested (there are no nodes here)."""

    def tier(self, node_id: str) -> str:
        return "none"

    def tiers(self, node_ids: Iterable[str]) -> dict[str, str]:
        return dict.fromkeys(node_ids, "none")

    def why_not_trusted(self, node_id: str) -> tuple[str, str] | None:
        return None

    def release_key(self, node_id: str, name: str, version: str, data_key: bytes) -> bytes:
        raise AssertionError("no key is released without a node")

    def revoke_model_keys(self, name: str, versions: list[str]) -> None:
        pass


class Affirmed:
    """Every node holds an affirming software-tier result; keys are 'released' as placeholders,
    except those of revoked versions (as the verifier does)."""

    def __init__(self) -> None:
        self.revoked: set[tuple[str, str]] = set()

    def tier(self, node_id: str) -> str:
        return "software"

    def tiers(self, node_ids: Iterable[str]) -> dict[str, str]:
        return dict.fromkeys(node_ids, "software")

    def why_not_trusted(self, node_id: str) -> tuple[str, str] | None:
        return None

    def release_key(self, node_id: str, name: str, version: str, data_key: bytes) -> bytes:
        if (name, version) in self.revoked:
            raise KeyReleaseError("attestation.key.revoked", f"{name}:{version} is revoked")
        return b"wrapped for " + node_id.encode()

    def revoke_model_keys(self, name: str, versions: list[str]) -> None:
        self.revoked.update((name, v) for v in versions)
