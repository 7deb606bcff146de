"""The encrypted FHIR R4 record store and its API, reached only through the repository."""
