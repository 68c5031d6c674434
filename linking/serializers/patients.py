"""GET /patient/<patient-id>: the FHIR Patient mapped to the API's shape."""

from rest_framework import serializers


class PatientNameSerializer(serializers.Serializer):
    text = serializers.CharField(allow_null=True)
    family = serializers.CharField(allow_null=True)
    given = serializers.ListField(child=serializers.CharField())


class PatientTelecomSerializer(serializers.Serializer):
    system = serializers.CharField(allow_null=True, help_text="phone, email, ...")
    value = serializers.CharField(allow_null=True)
    use = serializers.CharField(allow_null=True)


class PatientAddressSerializer(serializers.Serializer):
    text = serializers.CharField(allow_null=True)
    line = serializers.ListField(child=serializers.CharField())
    city = serializers.CharField(allow_null=True)
    locals()["postal-code"] = serializers.CharField(allow_null=True)
    country = serializers.CharField(allow_null=True)
    use = serializers.CharField(allow_null=True)


class PatientIdentifierSerializer(serializers.Serializer):
    system = serializers.CharField(allow_null=True)
    value = serializers.CharField(allow_null=True)


class PatientOutputSerializer(serializers.Serializer):
    """The linked internal patient's details (from the internal system's FHIR Patient)."""

    locals().update(
        {
            "patient-id": serializers.UUIDField(help_text="The customer's own patient id."),
            "name": PatientNameSerializer(),
            "birth-date": serializers.DateField(allow_null=True),
            "gender": serializers.CharField(allow_null=True),
            "telecom": PatientTelecomSerializer(many=True),
            "address": PatientAddressSerializer(many=True),
            "identifiers": PatientIdentifierSerializer(many=True),
        }
    )
