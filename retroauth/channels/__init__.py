"""Submission channels: how a retro-authorization request reaches a payer (FHIR PAS, X12 278, packet)."""
