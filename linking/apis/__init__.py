"""The link API, and the internal system's search callback: a module per operation family,
`common` for what they share. Views parse and call services."""
