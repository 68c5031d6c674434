"""A small FHIR R4 stand-in for the internal patient index (local runs and end-to-end tests)."""
