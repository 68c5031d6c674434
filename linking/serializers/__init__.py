"""Input and output serializers of the link API (one pair per operation), a module per
operation family; `fields` holds what they are built from."""
