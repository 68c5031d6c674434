import uuid

from django.core.validators import MaxValueValidator, MinValueValidator
from django.db import models

# The largest scheduling weight: a customer may be given up to this many times another's share.
MAX_WEIGHT = 100


class ReviewBy(models.TextChoices):
    """Who decides a workflow the linking policy sent to REVIEW."""

    OPERATOR = "operator", "our operators (the admin)"
    CUSTOMER = "customer", "the customer (POST /link/<workflow-id>/decision)"


class Customer(models.Model):
    """A customer system onboarded to the service; the subject of every customer token."""

    id = models.UUIDField(primary_key=True, default=uuid.uuid4, editable=False)
    name = models.CharField(max_length=200)
    is_active = models.BooleanField(default=True)
    webhook_url = models.URLField(max_length=2000)
    # Off after the endpoint answered 410 Gone: nothing is sent until an operator turns it on.
    webhook_enabled = models.BooleanField(default=True)
    # Standard Webhooks secret: "whsec_" + base64 of 32 random bytes.
    webhook_secret = models.CharField(max_length=100)
    # The secret before the last rotation, still signing (second signature) until the time
    # below, so the customer can switch secrets without rejecting a webhook. Blank: none.
    webhook_secret_previous = models.CharField(max_length=100, blank=True, default="")
    webhook_secret_previous_until = models.DateTimeField(null=True, blank=True)
    # Bumped to revoke every token issued before; tokens carry the version they were issued at.
    token_version = models.PositiveIntegerField(default=1)
    # This customer's matching bands; NULL = the settings AUTO_LINK_SCORE, AUTO_LINK_MARGIN and
    # REVIEW_MIN_SCORE. A customer whose records are poorer may want more of them reviewed.
    auto_link_score = models.FloatField(null=True, blank=True)
    auto_link_margin = models.FloatField(null=True, blank=True)
    review_min_score = models.FloatField(null=True, blank=True)
    review_by = models.CharField(max_length=16, choices=ReviewBy.choices, default=ReviewBy.OPERATOR)
    # Its share of each scheduling round (workflows/scheduler.py): a customer of weight 3 has up
    # to 3 workflows published for every 1 of a customer of weight 1 while both have work due.
    weight = models.PositiveSmallIntegerField(
        default=1, validators=[MinValueValidator(1), MaxValueValidator(MAX_WEIGHT)]
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]
        constraints = [
            models.CheckConstraint(
                condition=models.Q(weight__gte=1, weight__lte=MAX_WEIGHT),
                name="customer_weight_range",
            ),
            models.CheckConstraint(
                condition=models.Q(webhook_secret__startswith="whsec_"),  # noqa: S106
                name="customer_webhook_secret_format",
            ),
            # A previous secret always has an end, and an end always has a secret.
            models.CheckConstraint(
                condition=(
                    models.Q(webhook_secret_previous="", webhook_secret_previous_until__isnull=True)
                    | models.Q(
                        webhook_secret_previous__startswith="whsec_",  # noqa: S106
                        webhook_secret_previous_until__isnull=False,
                    )
                ),
                name="customer_webhook_secret_previous_has_end",
            ),
            models.CheckConstraint(
                condition=(
                    models.Q(auto_link_score__isnull=True)
                    | models.Q(auto_link_score__gte=0, auto_link_score__lte=1)
                )
                & (
                    models.Q(auto_link_margin__isnull=True)
                    | models.Q(auto_link_margin__gte=0, auto_link_margin__lte=1)
                )
                & (
                    models.Q(review_min_score__isnull=True)
                    | models.Q(review_min_score__gte=0, review_min_score__lte=1)
                ),
                name="customer_bands_in_unit_range",
            ),
            models.CheckConstraint(
                condition=models.Q(review_by__in=ReviewBy.values), name="customer_review_by_valid"
            ),
        ]

    def __str__(self) -> str:
        return f"{self.name} ({self.id})"

    # DRF's IsAuthenticated reads these from request.user, which is the authenticated Customer.
    @property
    def is_authenticated(self) -> bool:
        return True

    @property
    def is_anonymous(self) -> bool:
        return False
