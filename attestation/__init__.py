"""Remote attestation for edgeward, in the RATS roles of RFC 9334.

* Attester (node): :class:`attestation.responder.AttestationResponder` over an attester from
  :mod:`attestation.attesters` (``tpm2`` through tpm2-pytss, or ``software``). It keeps the
  measurement event log (:mod:`attestation.eventlog`), answers challenges with evidence and
  unwraps released model keys.
* Verifier (orchestrator): :class:`attestation.service.AttestationVerifierService` enrolls
  nodes (:mod:`attestation.enrollment`), issues single-use nonces, appraises evidence in a fixed
  order (:mod:`attestation.verifier`) against versioned reference values
  (:mod:`attestation.reference`) and signs attestation results (:mod:`attestation.results`).
* Relying party (scheduler, dispatcher): reads ``service.tier(node_id)`` and releases model keys
  with ``service.release_key(...)`` (:mod:`attestation.keyrelease`).

The wire messages are in ``edgeward/v1/attestation.proto``; the gRPC ``AttestationService`` is
served by :class:`attestation.grpc_api.AttestationServicer`. Each module's docstring describes
its part of the seam; docs/attestation.md has the threat model and operations guide.
"""
