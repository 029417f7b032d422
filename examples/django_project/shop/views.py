import json

from django.db import transaction
from django.http import HttpRequest, JsonResponse

from shop.models import Order
from shop.tasks import send_receipt


def create_order(request: HttpRequest) -> JsonResponse:
    """POST {"item": ..., "fail": bool}: the order and its receipt task are one transaction."""
    data = json.loads(request.body or b"{}")
    result = None
    try:
        with transaction.atomic():
            order = Order.objects.create(item=data.get("item", "?"))
            result = send_receipt.delay(order.pk)
            if data.get("fail"):
                raise ValueError("payment refused")
    except ValueError as exc:
        # The receipt task was rolled back with the order: it never existed.
        return JsonResponse({"error": str(exc), "task": result and result.id}, status=402)
    return JsonResponse({"order": order.pk, "task": result.id}, status=201)
