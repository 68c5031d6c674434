"""Input and output serializers of the link API (one pair per operation), a module per
operation family; `fields` holds what they are built from.

The API's member names are hyphenated (`workflow-id`), which no Python identifier can be, and
DRF has no wire-name option (marshmallow's `data_key`). A serializer declares such a field as
`locals().update({"workflow-id": ...})` in its class body: at class scope `locals()` is the
class namespace itself (defined so by PEP 667), which DRF's metaclass reads like any other
attribute, so the OpenAPI document names the field as the wire does. The alternatives each
hide something: renaming in to_representation/to_internal_value leaves the schema with the
Python names, and writing into `_declared_fields` after the class leans on DRF's internals.
"""
