"""POST /link/batch and GET /link/batch/<batch-id>: their serializers."""

from django.conf import settings
from rest_framework import serializers

from linking.serializers.fields import (
    StrictSerializer,
)
from merchant.schema import ProblemSerializer
from workflows.models import Result, Status


class LinkBatchInputSerializer(StrictSerializer):
    """The envelope only: each item is validated on its own, exactly as a POST /link body, so
    that a refused item never refuses the others (its problem is in the answer)."""

    requests = serializers.ListField(
        child=serializers.DictField(),
        min_length=1,
        max_length=settings.LINK_BATCH_MAX_ITEMS,
        help_text="Each item a POST /link body (`patient`, `webhook`) plus its own "
        "`idempotency-key` (the Idempotency-Key POST /link would take). Validated and accepted "
        "one by one: a refused item is answered with its problem and never refuses the others.",
    )


class LinkBatchItemSerializer(serializers.Serializer):
    """Schema only: one item of a batch's answer."""

    index = serializers.IntegerField(help_text="The item's position in `requests`, from 0.")
    locals().update(
        {
            "workflow-id": serializers.UUIDField(
                required=False, help_text="Accepted (or replayed): the item's workflow."
            ),
            "problem": ProblemSerializer(
                required=False, help_text="Refused: what POST /link would have answered."
            ),
        }
    )


class LinkBatchItemStatusSerializer(LinkBatchItemSerializer):
    status = serializers.ChoiceField(choices=Status.choices, required=False)
    result = serializers.ChoiceField(choices=Result.choices, required=False, allow_null=True)


class LinkBatchAcceptedSerializer(serializers.Serializer):
    locals().update(
        {
            "batch-id": serializers.UUIDField(),
            "accepted": serializers.IntegerField(),
            "refused": serializers.IntegerField(),
            "items": LinkBatchItemSerializer(many=True),
        }
    )


class LinkBatchStatusSerializer(serializers.Serializer):
    locals().update(
        {
            "batch-id": serializers.UUIDField(),
            "total": serializers.IntegerField(help_text="Items in the batch, refused ones too."),
            "by-status": serializers.DictField(
                child=serializers.IntegerField(),
                help_text="The accepted items' workflows by current status.",
            ),
            "items": LinkBatchItemStatusSerializer(many=True),
        }
    )
